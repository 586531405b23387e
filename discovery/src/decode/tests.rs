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

fn poison(cache: &mut KvCache) {
    cache.poison();
}

fn weights(set: &EndpointSet) -> Vec<(String, u32)> {
    set.iter().map(|e| (e.addr(), e.weight)).collect()
}

/// Three answers of one prefix captured from Consul (`testdata/capture-kv-history.sh`): a
/// value changed, a key deleted and one added, then a snapshot of the first state restored.
/// Every cached decode equals the uncached one; only changed entries are decoded again.
#[test]
fn kv_cache_decodes_only_changed_entries_of_a_captured_history() {
    let (first, second, restored) = (fixture("kv_hist_1.json"), fixture("kv_hist_2.json"), fixture("kv_hist_3.json"));
    let mut cache = KvCache::default();
    let d1 = decode_kv_cached("upstreams/hist", &first, &mut cache).unwrap();
    assert_eq!(d1, decode_kv("upstreams/hist", &first).unwrap());
    assert_eq!(addrs(&d1.value), ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080", "backend.local:9000"]);
    assert!(skipped_reason(&d1.skipped, "10.0.0.9").contains("no port"));
    assert_eq!(cache.len(), 5, "skipped entries are kept too");
    // The same answer again: everything from the cache, the same result.
    assert_eq!(decode_kv_cached("upstreams/hist", &first, &mut cache).unwrap(), d1);

    // 10.0.0.1 changed its value, 10.0.0.2 was deleted, 10.0.0.4 added, 10.0.0.9's value
    // changed (still no port); 10.0.0.3 and backend.local did not change.
    poison(&mut cache);
    let d2 = decode_kv_cached("upstreams/hist", &second, &mut cache).unwrap();
    assert_eq!(
        weights(&d2.value),
        [("10.0.0.1:8080".into(), 5), ("10.0.0.3:8080".into(), 99), ("10.0.0.4:8080".into(), 1), ("backend.local:9000".into(), 99)]
    );
    assert!(skipped_reason(&d2.skipped, "10.0.0.9").contains("no port"));
    let d2 = decode_kv_cached("upstreams/hist", &second, &mut KvCache::default()).unwrap();
    assert_eq!(d2, decode_kv("upstreams/hist", &second).unwrap());

    // The restored snapshot: 10.0.0.1's ModifyIndex went back (18 to 12) with its old value,
    // 10.0.0.2 is back, 10.0.0.4 gone: decoded again, not taken from the cache.
    let mut cache = KvCache::default();
    decode_kv_cached("upstreams/hist", &second, &mut cache).unwrap();
    poison(&mut cache);
    let d3 = decode_kv_cached("upstreams/hist", &restored, &mut cache).unwrap();
    assert_eq!(
        weights(&d3.value),
        [("10.0.0.1:8080".into(), 3), ("10.0.0.2:8080".into(), 1), ("10.0.0.3:8080".into(), 99), ("backend.local:9000".into(), 99)]
    );
    let mut fresh = KvCache::default();
    assert_eq!(decode_kv_cached("upstreams/hist", &restored, &mut fresh).unwrap(), decode_kv("upstreams/hist", &restored).unwrap());
}

/// An entry is taken from the cache only if its key, value and ModifyIndex are all the same:
/// a value changed under the same ModifyIndex (another cluster, a hand-made answer) or a
/// ModifyIndex changed with the same value is decoded again.
#[test]
fn kv_cache_needs_key_value_and_modify_index_to_match() {
    let body = |weight: u32, index: u64| {
        let v = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!(r#"{{"weight":{weight}}}"#));
        format!(r#"[{{"Key":"p/10.0.0.1:80","Value":"{v}","ModifyIndex":{index}}},{{"Key":"p/10.0.0.2:80","Value":null,"ModifyIndex":3}}]"#)
    };
    let mut cache = KvCache::default();
    let d = |cache: &mut KvCache, b: String| weights(&decode_kv_cached("p", b.as_bytes(), cache).unwrap().value);
    assert_eq!(d(&mut cache, body(2, 7)), [("10.0.0.1:80".into(), 2), ("10.0.0.2:80".into(), 1)]);
    poison(&mut cache);
    assert_eq!(d(&mut cache, body(3, 7)), [("10.0.0.1:80".into(), 3), ("10.0.0.2:80".into(), 99)], "same index, new value");
    poison(&mut cache);
    assert_eq!(d(&mut cache, body(3, 5)), [("10.0.0.1:80".into(), 3), ("10.0.0.2:80".into(), 99)], "same value, index back");
    poison(&mut cache);
    assert_eq!(d(&mut cache, body(3, 5)), [("10.0.0.1:80".into(), 99), ("10.0.0.2:80".into(), 99)], "all the same");
    // Another prefix, an empty answer or a cleared cache: nothing is reused.
    assert_eq!(d(&mut cache, body(3, 5).replace("p/", "q/")).len(), 0);
    poison(&mut cache);
    assert_eq!(d(&mut cache, body(3, 5)), [("10.0.0.1:80".into(), 3), ("10.0.0.2:80".into(), 1)]);
    poison(&mut cache);
    assert!(decode_kv_cached("p", b"", &mut cache).unwrap().value.is_empty());
    assert!(cache.is_empty());
    // A body that is not JSON leaves the cache as it was.
    decode_kv_cached("p", body(3, 5).as_bytes(), &mut cache).unwrap();
    assert!(decode_kv_cached("p", b"<html>", &mut cache).is_err());
    assert_eq!(cache.len(), 2);
}

/// Keys out of Consul's order, duplicates, siblings and the folder key: the cached decode
/// equals the uncached one, on the first answer and on a second that reuses the first.
#[test]
fn kv_cache_gives_what_decode_kv_gives_on_odd_answers() {
    let bodies: [&[u8]; 4] = [
        br#"[{"Key":"p/10.0.0.2:80"},{"Key":"p/10.0.0.1:80","Value":"eyJ3ZWlnaHQiOjJ9"},{"Key":"p/10.0.0.1:80"},{"Key":"p"},{"Key":"p2/10.0.0.3:80"}]"#,
        br#"[{"Key":"p/"},{"Key":"p/10.0.0.1:80","Value":"eyJ3ZWlnaHQiOjJ9"},{"Key":"p/10.0.0.2:80"},{"Key":"p/sub/10.0.0.5:80"},{"Key":"p/[::1]:80"}]"#,
        br#"[{"Key":"p/[::1]:80"},{"Key":"p/10.0.0.1:80","Value":"%%%"},{"Key":"p/Host.Example:81"},{"Key":"p/host.example:81"}]"#,
        &fixture("kv_app.json"),
    ];
    for prefix in ["p", "/p/", "upstreams/app/", ""] {
        let mut cache = KvCache::default();
        for a in bodies {
            for b in bodies {
                decode_kv_cached(prefix, a, &mut cache).unwrap();
                assert_eq!(decode_kv_cached(prefix, b, &mut cache).unwrap(), decode_kv(prefix, b).unwrap(), "{prefix:?}");
            }
        }
    }
}

/// What serde_json reads from a KV list (as `decode_kv_tree` and `decode_kv` do).
fn serde_kv_list(body: &[u8]) -> Option<Vec<(String, Option<String>, u64)>> {
    let tree: Vec<KvTreeEntry> = serde_json::from_slice(body).ok()?;
    let list: Vec<KvEntry> = serde_json::from_slice(body).ok()?;
    let out: Vec<_> = tree.into_iter().map(|e| (e.key.into_owned(), e.value.map(Cow::into_owned), e.modify_index)).collect();
    assert!(out.iter().zip(&list).all(|(t, l)| t.0 == l.key && t.1.as_deref() == l.value.as_deref()));
    Some(out)
}

fn scanned(body: &[u8]) -> Option<Vec<(String, Option<String>, u64)>> {
    scan_kv_list(body).map(|v| v.into_iter().map(|e| (e.key.to_string(), e.value.map(str::to_string), e.modify_index)).collect())
}

/// Consul's answers (captured) are read by the scan, as serde_json reads them; forms it does
/// not take are left to serde_json.
#[test]
fn kv_scan_reads_consul_answers_as_serde_does() {
    for name in ["kv_app.json", "kv_hist_1.json", "kv_hist_2.json", "kv_hist_3.json"] {
        let body = fixture(name);
        assert!(scanned(&body).is_some(), "{name} not scanned");
        assert_eq!(scanned(&body), serde_kv_list(&body), "{name}");
    }
    for (body, scans) in [
        (&br#" [ ] "#[..], true),
        (br#"[{"Key":"a","Value":null,"Session":"x","ModifyIndex":0}]"#, true),
        (br#"[{"Key":"a","Value":"\u0041"}]"#, false),
        (br#"[{"Key":"a","Key":"b"}]"#, false),
        (br#"[{"Key":"a","ModifyIndex":1,"ModifyIndex":2}]"#, false),
        (br#"[{"Key":"a","ModifyIndex":01}]"#, false),
        (br#"[{"Key":"a","ModifyIndex":1.0}]"#, false),
        (br#"[{"Key":"a","ModifyIndex":18446744073709551616}]"#, false),
        (br#"[{"Key":"a","Flags":-1}]"#, false),
        (br#"[{"Key":"a","Other":1}]"#, false),
        (br#"[{"Value":null}]"#, false),
        (br#"[["a",null]]"#, false),
        (br#"[{"Key":"a"}] x"#, false),
        (br#"[{"Key":"a"},]"#, false),
        (b"[{\"Key\":\"a\tb\"}]", false),
        (b"[{\"Key\":\"\xff\"}]", false),
    ] {
        assert_eq!(scanned(body).is_some(), scans, "{}", String::from_utf8_lossy(body));
        if scans {
            assert_eq!(scanned(body), serde_kv_list(body));
        }
    }
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

    /// Whatever the scan reads, serde_json reads the same way: Consul-shaped lists, indented or
    /// not, with one byte replaced, inserted or removed anywhere.
    #[test]
    fn kv_scan_agrees_with_serde(
        entries in prop::collection::vec((0u8..4, 0u8..3, 0u64..30), 0..5),
        pretty in any::<bool>(),
        edit in prop::option::of((any::<prop::sample::Index>(), 0u8..3, prop::sample::select(&b"\"\\{}[],:0123456789-.eEnul \n\txa\x01\xc3\xa9"[..]))),
    ) {
        let list: Vec<serde_json::Value> = entries
            .iter()
            .map(|&(k, v, i)| {
                let value = [serde_json::Value::Null, "eyJ3ZWlnaHQiOjJ9".into(), "".into()][v as usize].clone();
                serde_json::json!({ "LockIndex": 0, "Key": format!("p/10.0.0.{k}:80"), "Flags": 0, "Value": value, "CreateIndex": i, "ModifyIndex": i })
            })
            .collect();
        let mut body = if pretty { serde_json::to_vec_pretty(&list).unwrap() } else { serde_json::to_vec(&list).unwrap() };
        if edit.is_none() {
            prop_assert!(scanned(&body).is_some());
        }
        if let Some((at, how, byte)) = edit {
            let at = at.index(body.len() + 1);
            match how {
                0 if at < body.len() => body[at] = byte,
                1 => body.insert(at, byte),
                _ if at < body.len() => { body.remove(at); }
                _ => {}
            }
        }
        if let Some(s) = scanned(&body) {
            prop_assert_eq!(Some(s), serde_kv_list(&body));
        }
    }

    /// The eight-byte test never misses a byte that ends a string's plain part.
    #[test]
    fn kv_scan_word_test_misses_no_stop_byte(bytes in any::<[u8; 8]>(), at in 0usize..8, stop in prop::sample::select(&b"\"\\\x00\x1f\n"[..])) {
        let x = u64::from_le_bytes(bytes);
        prop_assert_eq!(may_stop_string(x), bytes.iter().any(|&c| STRING_STOP[c as usize]));
        let mut with = bytes;
        with[at] = stop;
        prop_assert!(may_stop_string(u64::from_le_bytes(with)));
    }

    /// Two answers of arbitrary keys and values through one cache decode as without it.
    #[test]
    fn kv_cache_decodes_as_decode_kv(answers in prop::collection::vec(prop::collection::vec((0u8..6, 0u8..4, 0u64..3), 0..8), 2..4)) {
        let mut cache = KvCache::default();
        for entries in answers {
            let body: Vec<serde_json::Value> = entries
                .iter()
                .map(|&(k, v, i)| {
                    let value = ["", "eyJ3ZWlnaHQiOjJ9", "eyJkb3duIjoxfQ==", "%%%"][v as usize];
                    let key = ["p/10.0.0.1:80", "p/10.0.0.2:80", "p/h.example:80", "p/bad", "p", "q/10.0.0.1:80"][k as usize];
                    serde_json::json!({ "Key": key, "Value": value, "ModifyIndex": i })
                })
                .collect();
            let body = serde_json::to_vec(&body).unwrap();
            prop_assert_eq!(decode_kv_cached("p", &body, &mut cache).unwrap(), decode_kv("p", &body).unwrap());
        }
    }
}
