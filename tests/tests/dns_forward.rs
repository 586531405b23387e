//! Forwarding of names outside the zone to a second resolver started here (a second
//! upsync-dns serving another zone), with a cache honouring TTLs, and the allow-list:
//! clients outside it (127.0.0.2 here) get REFUSED for names outside the zone while they
//! are still answered for the zone itself.
use serde_json::json;
use upsync_tests::consul::Consul;
use upsync_tests::dns::{dig, wait_dig, DnsOptions, DnsServer};
use upsync_tests::TestDir;

#[test]
fn forwards_outside_the_zone_with_a_ttl_cache_for_allowed_clients_only() {
    let dir = TestDir::new("dns_forward");
    let consul = Consul::start(dir.path());
    // The upstream: another zone, long positive TTL, 1 s negative TTL.
    let upstream = DnsServer::start(
        dir.path(),
        &consul.http_addr(),
        DnsOptions { config: Some("[dns]\nzone = \"upstream.test.\"\nttl = 600\nnegative_ttl = 1\n".into()), ..Default::default() },
    );
    let front = DnsServer::start(
        dir.path(),
        &consul.http_addr(),
        DnsOptions {
            args: vec!["--forward".into(), upstream.addr().to_string(), "--allow-recursion".into(), "127.0.0.1/32".into()],
            ..Default::default()
        },
    );
    consul.register_service(&json!({"ID": "w1", "Name": "web", "Address": "127.0.0.71", "Port": 80}));
    wait_dig(&upstream, "the upstream serving web", &["web.upstream.test.", "A"], |d| d.data("A") == ["127.0.0.71"]);

    let fwd = front.dig(&["web.upstream.test.", "A"]);
    assert_eq!(fwd.data("A"), ["127.0.0.71"], "{}", fwd.raw);
    assert!(fwd.has_flag("ra") && !fwd.has_flag("aa"), "a recursive, non-authoritative answer: {}", fwd.raw);
    assert!(fwd.answer[0].ttl <= 600 && fwd.answer[0].ttl > 0, "{}", fwd.raw);
    let local = front.dig(&["web.service.upsync.", "A"]);
    assert!(local.has_flag("aa") && local.has_flag("ra"), "{}", local.raw);

    // Outside the allow-list: REFUSED for other zones, answers for ours.
    let outside = front.dig(&["-b", "127.0.0.2", "web.upstream.test.", "A"]);
    assert_eq!(outside.status, "REFUSED", "{}", outside.raw);
    assert!(!outside.has_flag("ra"));
    let ours = front.dig(&["-b", "127.0.0.2", "web.service.upsync.", "A"]);
    assert_eq!(ours.data("A"), ["127.0.0.71"], "{}", ours.raw);

    // The positive answer is cached for its TTL: it outlives the upstream's own data.
    consul.deregister_service("w1");
    wait_dig(&upstream, "the upstream forgetting web", &["web.upstream.test.", "A"], |d| d.is_nxdomain());
    let cached = front.dig(&["web.upstream.test.", "A"]);
    assert_eq!(cached.data("A"), ["127.0.0.71"], "served from the cache: {}", cached.raw);
    assert!(cached.answer[0].ttl <= fwd.answer[0].ttl, "the TTL counts down: {} then {}", fwd.answer[0].ttl, cached.answer[0].ttl);

    // Negative answers are forwarded with the upstream's SOA and expire with its 1 s TTL.
    let nx = front.dig(&["api.upstream.test.", "A"]);
    assert_eq!(nx.status, "NXDOMAIN", "{}", nx.raw);
    assert!(nx.authority.iter().any(|r| r.rtype == "SOA" && r.name == "upstream.test."), "{}", nx.raw);
    consul.register_service(&json!({"ID": "a1", "Name": "api", "Address": "127.0.0.72", "Port": 80}));
    wait_dig(&upstream, "the upstream serving api", &["api.upstream.test.", "A"], |d| d.data("A") == ["127.0.0.72"]);
    wait_dig(&front, "the negative answer expiring", &["api.upstream.test.", "A"], |d| d.data("A") == ["127.0.0.72"]);
    assert!(front.metric("upsync_dns_forwarded_total").unwrap_or(0.0) >= 3.0, "{}", front.metrics());

    // TCP is forwarded too.
    let tcp = dig(front.addr(), &["+tcp", "api.upstream.test.", "A"]);
    assert_eq!(tcp.data("A"), ["127.0.0.72"], "{}", tcp.raw);
}
