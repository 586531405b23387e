//! upsync-dns answering for services registered in a real Consul agent, questioned with `dig`
//! and hickory's client: registration, deregistration, failing checks, tags, `down` and
//! `backup`, SRV with glue, NXDOMAIN vs NODATA, SOA/NS, PTR, TXT, and TC + TCP for large
//! answers.
use hickory_proto::rr::{RData, RecordType};
use serde_json::json;
use upsync_tests::consul::Consul;
use upsync_tests::dns::{hickory_query, wait_dig, DnsOptions, DnsServer};
use upsync_tests::TestDir;

fn service(id: &str, name: &str, addr: &str, port: u16, tags: &[&str]) -> serde_json::Value {
    json!({"ID": id, "Name": name, "Address": addr, "Port": port, "Tags": tags})
}

fn with_ttl_check(mut svc: serde_json::Value) -> serde_json::Value {
    let id = svc["ID"].as_str().unwrap_or_default().to_string();
    svc["Check"] = json!({"CheckID": format!("{id}-ttl"), "TTL": "10m", "Status": "passing"});
    svc
}

#[test]
fn registration_deregistration_and_failing_checks_show_in_answers() {
    let dir = TestDir::new("dns_register");
    let consul = Consul::start(dir.path());
    let dns = DnsServer::start(dir.path(), &consul.http_addr(), DnsOptions::default());
    let a = ["web.service.upsync.", "A"];
    assert!(dns.dig(&a).is_nxdomain(), "unknown before registration");

    consul.register_service(&with_ttl_check(service("web1", "web", "127.0.0.11", 8080, &[])));
    consul.register_service(&with_ttl_check(service("web2", "web", "127.0.0.12", 8081, &[])));
    let d = wait_dig(&dns, "both instances", &a, |d| d.data("A") == ["127.0.0.11", "127.0.0.12"]);
    assert!(d.has_flag("aa"), "authoritative: {}", d.raw);
    assert!(d.answer.iter().all(|r| r.ttl == 5), "default TTL 5 s: {}", d.raw);

    consul.ttl_check("web1-ttl", "fail");
    wait_dig(&dns, "the failing instance left out", &a, |d| d.data("A") == ["127.0.0.12"]);
    consul.ttl_check("web1-ttl", "warn");
    let d = dns.dig(&a);
    assert_eq!(d.data("A"), ["127.0.0.12"], "warning instances are not served by default: {}", d.raw);
    consul.ttl_check("web1-ttl", "pass");
    wait_dig(&dns, "the instance back once passing", &a, |d| d.data("A").len() == 2);

    // Maintenance mode is a critical check in Consul.
    consul.api("PUT", "/v1/agent/service/maintenance/web2?enable=true&reason=test", None).expect("maintenance on");
    wait_dig(&dns, "the instance in maintenance left out", &a, |d| d.data("A") == ["127.0.0.11"]);
    consul.api("PUT", "/v1/agent/service/maintenance/web2?enable=false", None).expect("maintenance off");
    wait_dig(&dns, "the instance back from maintenance", &a, |d| d.data("A").len() == 2);

    consul.deregister_service("web2");
    wait_dig(&dns, "the deregistered instance gone", &a, |d| d.data("A") == ["127.0.0.11"]);
    consul.deregister_service("web1");
    wait_dig(&dns, "NXDOMAIN once the service is gone", &a, |d| d.is_nxdomain());
}

#[test]
fn tags_down_backup_and_srv_with_glue() {
    let dir = TestDir::new("dns_srv");
    let consul = Consul::start(dir.path());
    let dns = DnsServer::start(dir.path(), &consul.http_addr(), DnsOptions::default());
    consul.register_service(&service("a1", "api", "127.0.0.21", 9001, &["v1", "weight=5"]));
    consul.register_service(&service("a2", "api", "127.0.0.22", 9002, &["v2"]));
    consul.register_service(&service("a3", "api", "127.0.0.23", 9003, &["v1", "down"]));
    consul.register_service(&service("b1", "api", "127.0.0.24", 9004, &["backup"]));
    let srv = ["api.service.upsync.", "SRV"];
    let d = wait_dig(&dns, "three usable instances", &srv, |d| d.answer.len() == 3);
    assert_eq!(
        d.data("SRV"),
        [
            "1 1 9002 127-0-0-22.addr.service.upsync.",
            "1 5 9001 127-0-0-21.addr.service.upsync.",
            "2 1 9004 127-0-0-24.addr.service.upsync."
        ],
        "weights from `weight=N`, the backup at a larger priority, `down` left out: {}",
        d.raw
    );
    let mut glue: Vec<String> = d.additional.iter().map(|r| format!("{} {} {}", r.name, r.rtype, r.data)).collect();
    glue.sort();
    assert_eq!(
        glue,
        [
            "127-0-0-21.addr.service.upsync. A 127.0.0.21",
            "127-0-0-22.addr.service.upsync. A 127.0.0.22",
            "127-0-0-24.addr.service.upsync. A 127.0.0.24"
        ],
        "glue for every target: {}",
        d.raw
    );
    // RFC 2782 and Consul's `_NAME._TAG` forms; targets resolve on their own.
    assert_eq!(dns.dig(&["_api._tcp.service.upsync.", "SRV"]).data("SRV"), d.data("SRV"));
    assert_eq!(dns.dig(&["_api._v1.service.upsync.", "SRV"]).data("SRV"), ["1 5 9001 127-0-0-21.addr.service.upsync."]);
    assert_eq!(dns.dig(&["127-0-0-24.addr.service.upsync.", "A"]).data("A"), ["127.0.0.24"]);

    // A/AAAA: primaries only while one is usable.
    assert_eq!(dns.dig(&["api.service.upsync.", "A"]).data("A"), ["127.0.0.21", "127.0.0.22"]);
    assert_eq!(dns.dig(&["v1.api.service.upsync.", "A"]).data("A"), ["127.0.0.21"]);
    assert_eq!(dns.dig(&["V2.Api.Service.Upsync.", "A"]).data("A"), ["127.0.0.22"], "names are case-insensitive");
    assert!(dns.dig(&["v9.api.service.upsync.", "A"]).is_nxdomain());
    assert!(dns.dig(&["down.api.service.upsync.", "A"]).is_nodata(), "a tag of an unusable instance exists, without answers");

    // The same through hickory's client: SRV with the glue in the additional section.
    let m = hickory_query(dns.addr(), "api.service.upsync.", RecordType::SRV, false).expect("hickory UDP query");
    assert_eq!(m.answers.len(), 3);
    assert!(m.metadata.authoritative);
    let targets: Vec<String> =
        m.answers.iter().filter_map(|r| if let RData::SRV(s) = &r.data { Some(s.target.to_ascii()) } else { None }).collect();
    for t in targets {
        assert!(m.additionals.iter().any(|g| g.name.to_ascii() == t && matches!(g.data, RData::A(_))), "no glue for {t}: {m:?}");
    }
    assert!(m.edns.is_some(), "EDNS answered with EDNS");

    // Tag changes apply: a1 goes down; then without primaries the backup answers A.
    consul.register_service(&service("a1", "api", "127.0.0.21", 9001, &["v1", "down"]));
    wait_dig(&dns, "a1 marked down", &["api.service.upsync.", "A"], |d| d.data("A") == ["127.0.0.22"]);
    consul.deregister_service("a2");
    wait_dig(&dns, "the backup serving A", &["api.service.upsync.", "A"], |d| d.data("A") == ["127.0.0.24"]);
}

#[test]
fn nxdomain_nodata_soa_ns_ptr_txt() {
    let dir = TestDir::new("dns_negative");
    let consul = Consul::start(dir.path());
    let dns = DnsServer::start(dir.path(), &consul.http_addr(), DnsOptions::default());
    let mut svc = service("w1", "web", "127.0.0.31", 8080, &["v1"]);
    svc["Meta"] = json!({"version": "1.4.2", "team": "edge"});
    consul.register_service(&svc);
    wait_dig(&dns, "web registered", &["web.service.upsync.", "A"], |d| d.data("A") == ["127.0.0.31"]);

    let nx = dns.dig(&["nope.service.upsync.", "A"]);
    assert!(nx.is_nxdomain(), "{}", nx.raw);
    let soa = &nx.authority[0];
    assert_eq!((soa.name.as_str(), soa.ttl), ("service.upsync.", 5), "{}", nx.raw);
    assert!(soa.data.starts_with("ns.service.upsync. hostmaster.service.upsync. "), "{}", nx.raw);
    for t in ["MX", "AAAA", "CNAME"] {
        let d = dns.dig(&["web.service.upsync.", t]);
        assert!(d.is_nodata(), "{t}: {}", d.raw);
    }
    assert!(dns.dig(&["deep.v1.web.service.upsync.", "A"]).is_nxdomain());

    assert_eq!(dns.dig(&["service.upsync.", "SOA"]).answer.len(), 1);
    let ns = dns.dig(&["service.upsync.", "NS"]);
    assert_eq!(ns.data("NS"), ["ns.service.upsync."]);
    assert!(ns.additional.iter().any(|r| r.name == "ns.service.upsync." && r.data == "127.0.0.1"), "NS glue: {}", ns.raw);
    assert_eq!(dns.dig(&["ns.service.upsync.", "A"]).data("A"), ["127.0.0.1"]);

    let ptr = dns.dig(&["-x", "127.0.0.31"]);
    assert_eq!(ptr.data("PTR"), ["web.service.upsync."], "{}", ptr.raw);
    assert!(ptr.has_flag("aa"));

    let txt = dns.dig(&["web.service.upsync.", "TXT"]);
    assert_eq!(
        txt.data("TXT"),
        [r#""id=w1" "node=upsync-test-PORT" "address=127.0.0.31:8080" "team=edge" "version=1.4.2""#
            .replace("PORT", &consul.ports.http.to_string())]
    );

    let out = dns.dig(&["example.com.", "A"]);
    assert_eq!(out.status, "REFUSED", "names outside the zone without forwarding: {}", out.raw);
    assert!(!out.has_flag("ra"));
}

#[test]
fn large_answers_are_truncated_over_udp_and_whole_over_tcp() {
    let dir = TestDir::new("dns_tcp");
    let consul = Consul::start(dir.path());
    let dns = DnsServer::start(dir.path(), &consul.http_addr(), DnsOptions::default());
    // 300 instances in a few catalog transactions (the agent API would take 300 calls), on an
    // external node: on the agent's own node, its anti-entropy would remove them.
    let mut ops = vec![json!({"Node": {"Verb": "set", "Node": {"Node": "ext-node", "Address": "127.0.0.99"}}})];
    ops.extend((0..300).map(|i| {
        json!({"Service": {"Verb": "set", "Node": "ext-node",
            "Service": {"ID": format!("big-{i}"), "Service": "big", "Address": format!("127.1.{}.{}", i / 200, i % 200 + 1), "Port": 10000 + i}}})
    }));
    for chunk in ops.chunks(64) {
        let (status, body) =
            consul.api("PUT", "/v1/txn", Some(serde_json::Value::from(chunk.to_vec()).to_string().as_bytes())).expect("txn");
        assert_eq!(status, 200, "txn: {body}");
    }
    let tcp = wait_dig(&dns, "300 SRV records over TCP", &["big.service.upsync.", "SRV", "+tcp"], |d| d.answer.len() == 300);
    assert_eq!(tcp.additional.iter().filter(|r| r.rtype == "A").count(), 300, "glue for every target");

    let udp = dns.dig(&["big.service.upsync.", "SRV", "+ignore", "+bufsize=1232"]);
    assert!(udp.has_flag("tc") && udp.answer.is_empty(), "UDP answer truncated with TC: {}", udp.raw);
    let no_edns = dns.dig(&["big.service.upsync.", "A", "+ignore", "+noedns"]);
    assert!(no_edns.has_flag("tc"), "300 A records exceed 512 bytes: {}", no_edns.raw);
    // dig's default: UDP, then TCP on TC.
    assert_eq!(dns.dig(&["big.service.upsync.", "SRV"]).answer.len(), 300);

    let m = hickory_query(dns.addr(), "big.service.upsync.", RecordType::SRV, false).expect("hickory UDP");
    assert!(m.metadata.truncation && m.answers.is_empty());
    let m = hickory_query(dns.addr(), "big.service.upsync.", RecordType::SRV, true).expect("hickory TCP");
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 300);
    let m = hickory_query(dns.addr(), "big.service.upsync.", RecordType::A, true).expect("hickory TCP");
    assert_eq!(m.answers.len(), 300);
    assert!(dns.metric("upsync_dns_truncated_total").unwrap_or(0.0) >= 2.0);
}

/// An instance deregistered without a drain (still passing) and a new one, with the instance
/// counts (`/v1/internal/ui/services`) read each time the service list's index moves.
#[test]
fn instances_leaving_and_joining_with_the_instance_counts_read() {
    let dir = TestDir::new("dns_counts");
    let consul = Consul::start(dir.path());
    for (id, addr) in [("api1", "127.0.0.31"), ("api2", "127.0.0.32"), ("api3", "127.0.0.33")] {
        consul.register_service(&with_ttl_check(service(id, "api", addr, 9000, &[])));
    }
    let dns = DnsServer::start(dir.path(), &consul.http_addr(), DnsOptions::default());
    let a = ["api.service.upsync.", "A"];
    wait_dig(&dns, "three instances", &a, |d| d.data("A").len() == 3);
    // The reads of the start are over: the instance counts were read, and a full read covers
    // the catalog as it is now (no detector wants another one).
    let now = consul.index("/v1/catalog/services").max(consul.index("/v1/catalog/nodes"));
    upsync_tests::wait_until("the start-up reads", std::time::Duration::from_secs(30), || {
        let log = dns.log();
        log.contains("read the instance counts") && newest_full_read(&log) >= now
    });

    consul.deregister_service("api2");
    wait_dig(&dns, "the deregistered instance gone", &a, |d| d.data("A") == ["127.0.0.31", "127.0.0.33"]);
    // The counts are read before the full read the same change wants (which then covers it
    // too, as quick as the patch on a catalog this small): they name the service.
    let named = r#"reading those services alone services=["api"]"#;
    upsync_tests::wait_until("the counts naming api", std::time::Duration::from_secs(10), || dns.log().contains(named));
    consul.register_service(&service("api4", "api", "127.0.0.34", 9000, &[]));
    wait_dig(&dns, "the new instance served", &a, |d| d.data("A") == ["127.0.0.31", "127.0.0.33", "127.0.0.34"]);

    let metrics = dns.metrics();
    assert!(!metrics.contains("watch=\"ui-services\""), "reading /v1/internal/ui/services failed:\n{metrics}\n{}", dns.log());
    assert!(!dns.log().contains("/v1/internal/ui/services with"), "{}", dns.log());
}

/// The index of the newest full read of the catalog in upsync-dns's log (0 before the first).
fn newest_full_read(log: &str) -> u64 {
    let index = |line: &str| line.split("read the catalog index=").nth(1)?.split_whitespace().next()?.parse::<u64>().ok();
    log.lines().filter_map(index).max().unwrap_or(0)
}

/// A service whose instances just changed gets a blocking query of its own (`hot_services`):
/// its next changes are served at once even when nothing else names them. The catalog-wide
/// reads are spaced out of this test's reach here (`catalog_read_budget = 0.000001`: a 1 ms
/// read is followed by 1,000 s of pause), so only that watch can carry the deregistration of
/// a passing instance and the re-registration of another in place with a new port (with
/// `hot_services = 0` this test times out).
#[test]
fn recently_changed_services_are_watched_on_their_own() {
    let dir = TestDir::new("dns_hot");
    let consul = Consul::start(dir.path());
    consul.register_service(&with_ttl_check(service("db1", "db", "127.0.0.41", 5432, &[])));
    let config = "[consul]\ncatalog_read_budget = 0.000001\nhot_services = 4\n".to_string();
    let dns = DnsServer::start(dir.path(), &consul.http_addr(), DnsOptions { config: Some(config), ..Default::default() });
    let (a, srv) = (["db.service.upsync.", "A"], ["db.service.upsync.", "SRV"]);
    wait_dig(&dns, "the first instance", &a, |d| d.data("A") == ["127.0.0.41"]);
    assert_eq!(dns.metric("upsync_dns_hot_services"), Some(0.0));

    // A new instance, its check critical until its first pass (Consul's default): the list of
    // critical checks names the service, which is read alone and becomes hot.
    let db2 = |port: u16, status: &str| json!({"ID": "db2", "Name": "db", "Address": "127.0.0.42", "Port": port, "Check": {"CheckID": "db2-ttl", "TTL": "10m", "Status": status}});
    consul.register_service(&db2(5432, "critical"));
    upsync_tests::wait_until("db watched on its own", std::time::Duration::from_secs(60), || {
        dns.metric("upsync_dns_hot_services") == Some(1.0)
    });
    consul.ttl_check("db2-ttl", "pass");
    wait_dig(&dns, "the new instance once passing", &a, |d| d.data("A") == ["127.0.0.41", "127.0.0.42"]);

    // Deregistered while passing: no check changes state, the service list stays the same.
    consul.deregister_service("db1");
    wait_dig(&dns, "the deregistered instance gone", &a, |d| d.data("A") == ["127.0.0.42"]);
    // Registered again in place with another port: the same instance, the same checks.
    consul.register_service(&db2(6432, "passing"));
    wait_dig(&dns, "the new port", &srv, |d| d.data("SRV") == ["1 1 6432 127-0-0-42.addr.service.upsync."]);
    assert_eq!(dns.metric("upsync_dns_catalog_reads_total"), Some(1.0), "only the first full read: {}", dns.log());
}

/// A node whose address changes, and a node that leaves the catalog: the services with
/// instances there are read alone at once (`/v1/catalog/nodes` names the nodes). Full reads
/// and instance counts are spaced out of this test's reach as above, and "multi" keeps its
/// name and tags in the service list, so nothing else can carry these changes.
#[test]
fn nodes_moving_or_leaving_show_in_answers_at_once() {
    let dir = TestDir::new("dns_nodes");
    let consul = Consul::start(dir.path());
    let put = |path: &str, body: serde_json::Value| {
        let (status, text) = consul.api("PUT", path, Some(body.to_string().as_bytes())).expect("Consul PUT");
        assert_eq!(status, 200, "PUT {path}: {text}");
    };
    // Instances without an address of their own: served at their node's.
    for (node, addr, id, name) in
        [("ext1", "127.0.0.61", "moving1", "moving"), ("ext2", "127.0.0.62", "multi2", "multi"), ("ext3", "127.0.0.63", "multi3", "multi")]
    {
        put("/v1/catalog/register", json!({"Node": node, "Address": addr, "Service": {"ID": id, "Service": name, "Port": 80}}));
    }
    let config = "[consul]\ncatalog_read_budget = 0.000001\n".to_string();
    let dns = DnsServer::start(dir.path(), &consul.http_addr(), DnsOptions { config: Some(config), ..Default::default() });
    let (moving, multi) = (["moving.service.upsync.", "A"], ["multi.service.upsync.", "A"]);
    wait_dig(&dns, "moving at its node's address", &moving, |d| d.data("A") == ["127.0.0.61"]);
    wait_dig(&dns, "multi on two nodes", &multi, |d| d.data("A") == ["127.0.0.62", "127.0.0.63"]);

    put("/v1/catalog/register", json!({"Node": "ext1", "Address": "127.0.0.71"}));
    wait_dig(&dns, "moving at its node's new address", &moving, |d| d.data("A") == ["127.0.0.71"]);
    put("/v1/catalog/deregister", json!({"Node": "ext2"}));
    wait_dig(&dns, "multi without the node that left", &multi, |d| d.data("A") == ["127.0.0.63"]);
    assert_eq!(dns.metric("upsync_dns_catalog_reads_total"), Some(1.0), "only the first full read: {}", dns.log());
}
