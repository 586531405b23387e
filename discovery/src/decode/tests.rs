//! Decoders on responses captured from Consul 1.8.7 (`testdata/capture.sh`), on malformed
//! inputs, and on arbitrary bytes (proptest: no input may panic).
use super::*;
use proptest::prelude::*;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/testdata/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e} (run discovery/testdata/capture.sh)"))
}

fn addrs(set: &EndpointSet) -> Vec<String> {
    set.iter().map(|e| e.addr()).collect()
}

fn by_addr<'a>(set: &'a EndpointSet, addr: &str) -> &'a Endpoint {
    set.iter().find(|e| e.addr() == addr).unwrap_or_else(|| panic!("{addr} not in {:?}", addrs(set)))
}

fn skipped_reason<'a>(skipped: &'a [Skipped], key_part: &str) -> &'a str {
    &skipped.iter().find(|s| s.key.contains(key_part)).unwrap_or_else(|| panic!("{key_part} not skipped: {skipped:?}")).reason
}

#[test]
fn kv_fixture_decodes_like_nginx_upsync_module() {
    let d = decode_kv("upstreams/app/", &fixture("kv_app.json")).unwrap();
    assert_eq!(addrs(&d.value), ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080", "[::1]:8081", "backend.local:9000"]);
    let e1 = by_addr(&d.value, "10.0.0.1:8080");
    assert_eq!((e1.weight, e1.max_fails, e1.fail_timeout, e1.down, e1.backup), (3, 2, 10, false, false));
    // strings, "30s", down as "1"
    let e2 = by_addr(&d.value, "10.0.0.2:8080");
    assert_eq!((e2.weight, e2.max_fails, e2.fail_timeout, e2.down), (5, 0, 30, true));
    // empty value: the defaults
    assert_eq!(*by_addr(&d.value, "10.0.0.3:8080"), Endpoint::new(Host::parse("10.0.0.3").unwrap(), 8080));
    assert!(by_addr(&d.value, "[::1]:8081").backup);
    assert_eq!(by_addr(&d.value, "backend.local:9000").host, Host::Name("backend.local".into()));

    assert!(skipped_reason(&d.skipped, "10.0.0.4").contains("no port"));
    assert!(skipped_reason(&d.skipped, "10.0.0.5:0").contains("port"));
    assert!(skipped_reason(&d.skipped, "10.0.0.6").contains("not a JSON object"));
    assert!(skipped_reason(&d.skipped, "10.0.0.7").contains("weight=0"));
    assert!(skipped_reason(&d.skipped, "sub/").contains("nested"));
    assert_eq!(d.skipped.len(), 5, "{:?}", d.skipped);
    // The prefix may be given without the trailing slash.
    assert_eq!(decode_kv("upstreams/app", &fixture("kv_app.json")).unwrap(), d);
}

#[test]
fn kv_ignores_siblings_sharing_the_prefix() {
    let body = br#"[{"Key":"up/app2/10.0.0.1:80","Value":null},{"Key":"up/app","Value":null},{"Key":"up/app/10.0.0.2:80","Value":null}]"#;
    let d = decode_kv("up/app", body).unwrap();
    assert_eq!(addrs(&d.value), ["10.0.0.2:80"]);
    assert!(d.skipped.is_empty());
}

#[test]
fn kv_empty_bodies_are_empty_sets() {
    for body in [&b""[..], b"  \n", b"null", b"[]"] {
        let d = decode_kv("p", body).unwrap();
        assert!(d.value.is_empty() && d.skipped.is_empty());
    }
}

#[test]
fn kv_value_forms() {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let one = |v: &str| -> Result<Endpoint, String> {
        let body = format!(r#"[{{"Key":"p/10.0.0.1:80","Value":"{}"}}]"#, b64(v));
        let d = decode_kv("p", body.as_bytes()).unwrap();
        match d.value.iter().next() {
            Some(e) => Ok(e.clone()),
            None => Err(d.skipped[0].reason.clone()),
        }
    };
    assert_eq!(one(r#"{"down":true,"backup":"true"}"#).map(|e| (e.down, e.backup)), Ok((true, true)));
    assert_eq!(one(r#"{"fail_timeout":"2m"}"#).map(|e| e.fail_timeout), Ok(120));
    assert_eq!(one(r#"{"fail_timeout":"1500ms"}"#).map(|e| e.fail_timeout), Ok(2));
    assert_eq!(one(r#"{"weight":2.0,"other":{"x":[1]}}"#).map(|e| e.weight), Ok(2));
    assert_eq!(one("  ").map(|e| e.weight), Ok(1));
    assert_eq!(one(r#"{"weight":null}"#).map(|e| e.weight), Ok(1));
    assert!(one(r#"{"weight":-1}"#).unwrap_err().contains("weight"));
    assert!(one(r#"{"weight":"ten"}"#).unwrap_err().contains("weight"));
    assert!(one(r#"{"max_fails":5000000000}"#).unwrap_err().contains("max_fails"));
    assert!(one(r#"{"down":"maybe"}"#).unwrap_err().contains("down"));
    assert!(one(r#"{"fail_timeout":"10y"}"#).unwrap_err().contains("fail_timeout"));
    assert!(one("[1,2]").unwrap_err().contains("not a JSON object"));
    let bad_b64 = decode_kv("p", br#"[{"Key":"p/10.0.0.1:80","Value":"%%%"}]"#).unwrap();
    assert!(bad_b64.skipped[0].reason.contains("base64"));
}

#[test]
fn kv_names_ipv6_and_duplicates() {
    let body = br#"[{"Key":"p/::1:80"},{"Key":"p/[::1]:80"},{"Key":"p/[0:0::1]:80"},{"Key":"p/-bad-:80"},{"Key":"p/Host.Example:80"}]"#;
    let d = decode_kv("p/", body).unwrap();
    assert_eq!(addrs(&d.value), ["[::1]:80", "host.example:80"]);
    assert!(skipped_reason(&d.skipped, "p/::1:80").contains("brackets"));
    assert!(skipped_reason(&d.skipped, "-bad-").contains("host name"));
    assert!(d.skipped.iter().any(|s| s.reason.contains("duplicate")), "{:?}", d.skipped);
}

#[test]
fn malformed_bodies_are_errors_naming_the_response() {
    for body in [&b"<html>"[..], b"{\"Key\":1}", b"[{\"Key\":5}]", b"[1,2", b"\"x\""] {
        let e = decode_kv("p", body).unwrap_err();
        assert_eq!(e.what, "KV list");
        assert!(e.to_string().contains("invalid JSON"), "{e}");
    }
    assert!(decode_catalog_service(b"{}").is_err());
    assert!(decode_health_service(b"[{}]", HealthMode::MarkDown).is_err());
    assert!(decode_services(b"[]").is_err());
}

#[test]
fn catalog_fixture_uses_service_then_node_address_and_tags() {
    let d = decode_catalog_service(&fixture("catalog_web.json")).unwrap();
    assert_eq!(addrs(&d.value), ["10.1.0.1:80", "10.1.0.2:80", "127.0.0.1:8080", "[fd00::6]:81"]);
    let w1 = by_addr(&d.value, "10.1.0.1:80");
    assert_eq!((w1.weight, w1.max_fails, w1.fail_timeout), (10, 3, 20));
    assert_eq!(w1.meta.get("version").map(String::as_str), Some("1.2"));
    assert_eq!((w1.node.as_deref(), w1.service.as_deref(), w1.service_id.as_deref()), (Some("capture-node"), Some("web"), Some("web-1")));
    assert!(w1.tags.contains(&"v1".to_string()));
    assert!(by_addr(&d.value, "10.1.0.2:80").backup);
    // No service address: the node's. No weight tag: Consul's Weights.Passing.
    let w3 = by_addr(&d.value, "127.0.0.1:8080");
    assert!(w3.down);
    assert_eq!(w3.weight, 7);
    assert!(skipped_reason(&d.skipped, "web-4").contains("weight"));
    assert!(skipped_reason(&d.skipped, "web-5").contains("port 0"));
    assert!(d.value.iter().all(|e| e.health == Health::Passing));
}

#[test]
fn health_fixture_marks_or_omits_unhealthy_instances() {
    let d = decode_health_service(&fixture("health_web.json"), HealthMode::MarkDown).unwrap();
    assert_eq!(addrs(&d.value), ["10.1.0.1:80", "10.1.0.2:80", "127.0.0.1:8080", "[fd00::6]:81"]);
    let h = |a: &str| (by_addr(&d.value, a).health, by_addr(&d.value, a).down);
    assert_eq!(h("10.1.0.1:80"), (Health::Passing, false));
    assert_eq!(h("10.1.0.2:80"), (Health::Warning, true));
    assert_eq!(h("127.0.0.1:8080"), (Health::Critical, true));
    assert_eq!(h("[fd00::6]:81"), (Health::Passing, false));
    assert_eq!(d.skipped.len(), 2, "{:?}", d.skipped);

    let o = decode_health_service(&fixture("health_web.json"), HealthMode::Omit).unwrap();
    assert_eq!(addrs(&o.value), ["10.1.0.1:80", "[fd00::6]:81"]);
}

#[test]
fn services_fixture() {
    let s = decode_services(&fixture("services.json")).unwrap();
    assert_eq!(s.keys().collect::<Vec<_>>(), ["consul", "db", "web"]);
    assert_eq!(s["db"], ["primary"]);
    assert!(s["web"].windows(2).all(|w| w[0] < w[1]), "tags sorted and unique: {:?}", s["web"]);
    assert!(decode_services(br#"{"x":null}"#).unwrap()["x"].is_empty());
}

#[test]
fn same_input_same_order_whatever_the_response_order() {
    let body = fixture("health_web.json");
    let mut entries: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
    entries.reverse();
    let reversed = serde_json::to_vec(&entries).unwrap();
    assert_eq!(
        decode_health_service(&body, HealthMode::MarkDown).unwrap().value,
        decode_health_service(&reversed, HealthMode::MarkDown).unwrap().value
    );
}

/// The fuzz corpus: every file of `testdata/fuzz/` must decode or fail without panicking.
#[test]
fn fuzz_corpus_does_not_panic() {
    let dir = format!("{}/testdata/fuzz", env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir}: {e}")) {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        decode_all(&data);
        n += 1;
    }
    assert!(n > 0, "empty corpus in {dir}");
}

fn decode_all(data: &[u8]) {
    let _ = decode_kv("p", data);
    let _ = decode_kv("", data);
    let _ = decode_catalog_service(data);
    let _ = decode_health_service(data, HealthMode::MarkDown);
    let _ = decode_health_service(data, HealthMode::Omit);
    let _ = decode_services(data);
    let _ = decode_node_dump(data);
    let _ = decode_check_states(data);
    let _ = decode_instance_counts(data);
    let _ = decode_node_addresses(data);
    let _ = decode_health_instances(data);
}

/// JSON-ish strings built from the pieces Consul responses are made of, so the generator
/// reaches deep into the decoders rather than failing at the first byte.
fn jsonish() -> impl Strategy<Value = String> {
    let atoms = prop::sample::select(vec![
        "[",
        "]",
        "{",
        "}",
        ",",
        ":",
        "\"",
        "null",
        "true",
        "0",
        "-1",
        "1e400",
        "65536",
        "\"Key\"",
        "\"Value\"",
        "\"p/10.0.0.1:80\"",
        "\"p/[::1]:80\"",
        "\"eyJ3ZWlnaHQiOiIyIn0=\"",
        "\"ServiceAddress\"",
        "\"ServicePort\"",
        "\"ServiceTags\"",
        "\"weight=\"",
        "\"down\"",
        "\"Node\"",
        "\"Service\"",
        "\"Checks\"",
        "\"Status\"",
        "\"critical\"",
        "\"Port\"",
        "\"Address\"",
        "\"\\u0000\"",
        "\"\\ud800\"",
        "\u{feff}",
        " ",
    ]);
    prop::collection::vec(atoms, 0..60).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn decoders_never_panic_on_bytes(data in prop::collection::vec(any::<u8>(), 0..300)) {
        decode_all(&data);
    }

    #[test]
    fn decoders_never_panic_on_jsonish(s in jsonish()) {
        decode_all(s.as_bytes());
    }

    #[test]
    fn kv_never_panics_on_any_key_or_value(key in ".{0,40}", value in prop::collection::vec(any::<u8>(), 0..80)) {
        use base64::Engine as _;
        let body = serde_json::json!([{ "Key": format!("p/{key}"), "Value": base64::engine::general_purpose::STANDARD.encode(&value) }]);
        let d = decode_kv("p", body.to_string().as_bytes()).unwrap();
        prop_assert_eq!(d.value.len() + d.skipped.len() <= 1, true);
    }
}
