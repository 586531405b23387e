//! The etcd decoders on answers captured from etcd 3.5.1 (`testdata/capture-etcd.sh`: the
//! entries of Consul's `kv_app.json` written through both APIs, the errors the watch handles, a
//! watch stream), on arbitrary bytes (proptest: no input may panic), and the watch's state
//! machine without a network (the same against real etcd: tests/tests/module_etcd.rs).
use super::*;
use crate::config::ConsulConfig;
use crate::decode::{decode_kv, Skipped};
use proptest::prelude::*;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/testdata/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e} (run discovery/testdata/capture-etcd.sh)"))
}

fn lines(name: &str) -> Vec<Vec<u8>> {
    fixture(name).split(|&b| b == b'\n').filter(|l| !l.is_empty()).map(<[u8]>::to_vec).collect()
}

fn addrs(set: &EndpointSet) -> Vec<String> {
    set.iter().map(|e| e.addr()).collect()
}

/// Skipped entries as (server name, reason), the key's folder left out.
fn skipped_by_name(skipped: &[Skipped]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = skipped
        .iter()
        .map(|s| (s.key.trim_start_matches('/').trim_start_matches("upstreams/app/").to_string(), s.reason.clone()))
        .collect();
    v.sort();
    v
}

#[test]
fn v2_and_v3_listings_decode_as_the_same_entries_in_consul_kv() {
    let consul = decode_kv("upstreams/app", &fixture("kv_app.json")).unwrap();
    let v2 = decode_v2_keys("upstreams/app", &fixture("etcd_v2_keys.json")).unwrap();
    let range = decode_v3_range(&fixture("etcd_v3_range.json")).unwrap();
    assert_eq!(range.revision, 12);
    assert_eq!(range.kvs.len(), 10);
    let v3 = kv_endpoints_raw("upstreams/app", range.kvs.iter().map(|kv| (kv.key.as_str(), kv.value.as_ref())));
    for (api, d) in [("v2", &v2), ("v3", &v3)] {
        assert_eq!(d.value, consul.value, "{api}");
        assert_eq!(skipped_by_name(&d.skipped), skipped_by_name(&consul.skipped), "{api}");
    }
    assert_eq!(addrs(&v2.value), ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080", "[::1]:8081", "backend.local:9000"]);
    // v2 keys keep their leading slash in what is reported.
    assert!(v2.skipped.iter().any(|s| s.key == "/upstreams/app/sub/10.0.0.8:8080" && s.reason.contains("nested")), "{:?}", v2.skipped);
    assert!(v3.skipped.iter().any(|s| s.key == "upstreams/app/10.0.0.6:8080" && s.reason.contains("not a JSON object")));
}

#[test]
fn v2_errors_and_v3_empty_ranges() {
    assert_eq!(v2_error(&fixture("etcd_v2_not_found.json")).map(|e| e.code), Some(V2_KEY_NOT_FOUND));
    let cleared = v2_error(&fixture("etcd_v2_cleared.json")).unwrap();
    assert_eq!(cleared.code, V2_EVENT_INDEX_CLEARED);
    assert!(cleared.message.contains("outdated and cleared"));
    assert!(v2_error(&fixture("etcd_v2_keys.json")).is_none());
    let empty = decode_v3_range(&fixture("etcd_v3_range_empty.json")).unwrap();
    assert_eq!((empty.revision, empty.kvs.len()), (12, 0));
    // The change a v2 long poll returns is a valid listing of one key (the watch reads afresh).
    let polled = decode_v2_keys("upstreams/app", &fixture("etcd_v2_watch.json")).unwrap();
    assert_eq!(addrs(&polled.value), ["10.0.0.9:8080"]);
}

#[test]
fn v3_watch_stream_messages() {
    let l = lines("etcd_v3_watch.jsonl");
    assert_eq!(decode_v3_watch(&l[0]).unwrap(), WatchMessage::Created { revision: 12 });
    let put = |key: &str, value: &str, rev: u64| {
        KvEvent::Put(KeyValue { key: key.into(), value: Bytes::from(value.to_string()), mod_revision: rev })
    };
    assert_eq!(
        decode_v3_watch(&l[1]).unwrap(),
        WatchMessage::Events { events: vec![put("upstreams/app/10.0.0.9:8080", r#"{"weight":9}"#, 13)] }
    );
    assert_eq!(
        decode_v3_watch(&l[2]).unwrap(),
        WatchMessage::Events { events: vec![KvEvent::Delete { key: "upstreams/app/10.0.0.1:8080".into(), mod_revision: 14 }] }
    );
    assert_eq!(decode_v3_watch(&l[3]).unwrap(), WatchMessage::Events { events: vec![put("upstreams/app/10.0.0.10:8080", "", 15)] });
    let c = lines("etcd_v3_compacted.jsonl");
    assert_eq!(decode_v3_watch(&c[0]).unwrap(), WatchMessage::Created { revision: 15 });
    assert_eq!(decode_v3_watch(&c[1]).unwrap(), WatchMessage::Compacted { compact_revision: 15 });
    // Other shapes etcd's gateway produces: numbers for int64, a stream error, a progress
    // notification, a cancel with a reason.
    assert_eq!(
        decode_v3_watch(br#"{"result":{"header":{"revision":20},"events":[{"type":1,"kv":{"key":"YQ==","mod_revision":20}}]}}"#).unwrap(),
        WatchMessage::Events { events: vec![KvEvent::Delete { key: "a".into(), mod_revision: 20 }] }
    );
    assert_eq!(
        decode_v3_watch(
            br#"{"error":{"grpc_code":14,"http_code":503,"message":"etcdserver: no leader","http_status":"Service Unavailable"}}"#
        )
        .unwrap(),
        WatchMessage::Error { message: "etcdserver: no leader".into() }
    );
    assert_eq!(decode_v3_watch(br#"{"result":{"header":{"revision":"30"}}}"#).unwrap(), WatchMessage::Progress { revision: 30 });
    assert_eq!(
        decode_v3_watch(br#"{"result":{"header":{},"canceled":true,"cancel_reason":"etcdserver: no leader"}}"#).unwrap(),
        WatchMessage::Canceled { reason: "etcdserver: no leader".into() }
    );
    for (bad, why) in [
        (&b"<html>"[..], "invalid JSON"),
        (b"{}", "neither"),
        (br#"{"result":{"events":[{"type":"PATCH","kv":{"key":"YQ=="}}]}}"#, "unknown event type"),
        (br#"{"result":{"events":[{"kv":{"key":"@@@"}}]}}"#, "not base64"),
        (br#"{"result":{"events":[{}]}}"#, "without \"kv\""),
        (br#"{"result":{"header":{"revision":"-1"},"created":true}}"#, "not a revision"),
    ] {
        let e = decode_v3_watch(bad).unwrap_err();
        assert!(e.to_string().contains(why), "{}: {e}", String::from_utf8_lossy(bad));
    }
    assert!(decode_v3_range(br#"{"header":{"revision":"5"},"kvs":[],"more":true}"#).unwrap_err().to_string().contains("incomplete"));
    assert!(decode_v3_range(br#"{"kvs":[]}"#).unwrap_err().to_string().contains("no revision"));
}

#[test]
fn key_ranges_and_paths() {
    assert_eq!(v3_range("upstreams/app"), (b"upstreams/app/".to_vec(), b"upstreams/app0".to_vec()));
    assert_eq!(v3_range("/upstreams/app/"), (b"/upstreams/app/".to_vec(), b"/upstreams/app0".to_vec()));
    assert_eq!(v3_range(""), (vec![0], vec![0]));
    assert_eq!(v2_path("upstreams/my app"), "/v2/keys/upstreams/my%20app");
    assert_eq!(dir(EtcdApi::V2, "upstreams/app/"), "/upstreams/app");
    assert_eq!(dir(EtcdApi::V3, "/upstreams/app/"), "/upstreams/app");
    use crate::watch::Query;
    assert_eq!(Query::Etcd { api: EtcdApi::V2, prefix: "upstreams/app".into() }.path(), "/v2/keys/upstreams/app");
    assert_eq!(Query::Etcd { api: EtcdApi::V3, prefix: "/upstreams/app".into() }.path(), "/v3/kv//upstreams/app");
}

#[test]
fn errors_speak_of_etcd_and_say_what_to_do() {
    let a = ConsulAddr::parse("127.0.0.1:2379").unwrap();
    let refused = reword(Error::Connect { address: a.clone(), message: "Connection refused".into() }).to_string();
    assert!(refused.starts_with("etcd at http://127.0.0.1:2379: cannot connect") && !refused.contains("Consul"), "{refused}");
    // The message forms the module counts errors by (model.rs, ErrorKind::of).
    let stalled = Error::Stalled { address: a.clone(), method: "GET".into(), path: "/v2/keys/x".into(), after: Duration::from_secs(10) };
    let forms = [
        (Error::Tls { address: a.clone(), message: "BadCertificate".into() }, ": TLS handshake failed"),
        (Error::Timeout { address: a.clone(), method: "GET".into(), path: "/x".into(), after: Duration::from_secs(10) }, ": no answer to "),
        (stalled, " was not complete "),
        (Error::Transport { address: a.clone(), method: "GET".into(), path: "/x".into(), message: "EOF".into() }, ": HTTP exchange failed"),
        (Error::TooLarge { address: a.clone(), path: "/v3/watch".into(), limit: 4096 }, " exceeds "),
    ];
    for (e, form) in forms {
        let m = reword(e).to_string();
        assert!(m.starts_with("etcd at http://127.0.0.1:2379: ") && m.contains(form), "{m}");
    }
    let no_v2 = status_error(EtcdApi::V2, &a, "GET /v2/keys/x", 404, b"404 page not found\n").to_string();
    assert!(no_v2.contains("HTTP 404: 404 page not found") && no_v2.contains("--enable-v2") && no_v2.contains("/v3/kv/PREFIX"), "{no_v2}");
    let gw = status_error(EtcdApi::V3, &a, "POST /v3/kv/range", 400, &fixture("etcd_v3_error.json")).to_string();
    assert!(gw.contains("HTTP 400: invalid character"), "{gw}");
    let no_leader = br#"{"error":{"grpc_code":14,"http_code":503,"http_status":"Service Unavailable","message":"etcdserver: no leader"}}"#;
    let nl = status_error(EtcdApi::V3, &a, "POST /v3/watch", 503, no_leader).to_string();
    assert!(nl.ends_with("POST /v3/watch: HTTP 503: etcdserver: no leader"), "{nl}");
    let v2 = status_error(
        EtcdApi::V2,
        &a,
        "GET /v2/keys/x",
        500,
        br#"{"errorCode":300,"message":"Raft Internal Error","cause":"etcdserver: request timed out"}"#,
    );
    assert!(v2.to_string().contains("Raft Internal Error (error 300, etcdserver: request timed out)"), "{v2}");
}

fn watch(api: EtcdApi) -> EtcdWatch {
    let client = Client::new(ConsulConfig::from_addresses("127.0.0.1:1,127.0.0.1:2").unwrap()).unwrap();
    EtcdWatch::new(client, api, "upstreams/app".into(), WatchOptions::default())
}

fn changed(w: &mut EtcdWatch) -> Option<Vec<String>> {
    match w.changed() {
        Step::Yield(WatchEvent::Changed { value, .. }) => Some(addrs(value.as_endpoints().unwrap())),
        Step::Yield(other) => panic!("{other:?}"),
        Step::Continue => None,
    }
}

#[test]
fn the_v3_watch_applies_events_to_the_range_it_read() {
    let a = ConsulAddr::parse("127.0.0.1:1").unwrap();
    let mut w = watch(EtcdApi::V3);
    let range = decode_v3_range(&fixture("etcd_v3_range.json")).unwrap();
    w.index = range.revision;
    w.keys = range.kvs.into_iter().map(|kv| (kv.key, kv.value)).collect();
    w.held = w.keys.iter().map(|(k, v)| k.len() + v.len()).sum();
    assert_eq!(changed(&mut w).unwrap().len(), 5, "the first set is always yielded");
    assert!(changed(&mut w).is_none(), "an unchanged set is not yielded again");
    for line in lines("etcd_v3_watch.jsonl") {
        assert!(matches!(w.on_message(&a, decode_v3_watch(&line).unwrap()), Ok(Step::Continue)));
    }
    assert!(w.dirty);
    assert_eq!(w.index, 15, "the last event's revision is where the watch resumes from");
    assert_eq!(
        changed(&mut w).unwrap(),
        ["10.0.0.2:8080", "10.0.0.3:8080", "10.0.0.9:8080", "10.0.0.10:8080", "[::1]:8081", "backend.local:9000"]
    );
    // What the watch holds is bounded like a read (max_response_bytes): past it, a fresh read.
    let held = w.held;
    assert_eq!(held, w.keys.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>());
    let big =
        KvEvent::Put(KeyValue { key: "upstreams/app/10.0.0.99:80".into(), value: Bytes::from(vec![b' '; 300 << 20]), mod_revision: 16 });
    let e = w.on_message(&a, WatchMessage::Events { events: vec![big] }).unwrap_err().to_string();
    assert!(e.contains("the size of the keys under the prefix exceeds 268435456 bytes"), "{e}");
    assert_eq!(w.next, Next::Read);
    w.on_message(&a, WatchMessage::Events { events: vec![KvEvent::Delete { key: "upstreams/app/10.0.0.99:80".into(), mod_revision: 17 }] })
        .unwrap();
    assert_eq!(w.held, held);
    w.next = Next::Wait;
    // A progress notification moves the resume point; compaction asks for a fresh read.
    w.on_message(&a, WatchMessage::Progress { revision: 40 }).unwrap();
    assert_eq!(w.index, 40);
    assert_eq!(w.next, Next::Wait);
    w.on_message(&a, WatchMessage::Compacted { compact_revision: 41 }).unwrap();
    assert_eq!(w.next, Next::Read);
}

#[test]
fn the_v3_watch_refuses_what_it_cannot_trust_and_moves_to_the_next_member() {
    let first = ConsulAddr::parse("127.0.0.1:1").unwrap();
    let mut w = watch(EtcdApi::V3);
    w.next = Next::Wait;
    w.index = 10;
    // Changes before "created": not from a watch this client made.
    let early = WatchMessage::Events { events: vec![KvEvent::Delete { key: "upstreams/app/x".into(), mod_revision: 11 }] };
    let e = w.on_message(&first, early).unwrap_err().to_string();
    assert!(e.contains("POST /v3/watch cannot be used: it sent changes before the watch was created"), "{e}");
    // A member behind what was read (still catching up, or restored from a backup): read afresh.
    w.on_message(&first, WatchMessage::Created { revision: 5 }).unwrap();
    assert_eq!(w.next, Next::Read);
    // A member without a leader ends the watch: the next attempt goes to the next member.
    assert_eq!(w.client.current_address(), &first);
    let e = w.on_message(&first, WatchMessage::Canceled { reason: "etcdserver: no leader".into() }).unwrap_err();
    assert!(e.to_string().contains("canceled: etcdserver: no leader"), "{e}");
    assert_eq!(w.client.current_address().port, 2);
    let ev = w.fail(e);
    assert!(matches!(ev, WatchEvent::Error { attempt: 1, index: 10, .. }), "{ev:?}");
}

#[tokio::test]
async fn a_member_that_cannot_be_reached_is_an_error_in_etcd_words() {
    let mut w = watch(EtcdApi::V3);
    match w.next().await {
        WatchEvent::Error { error, attempt: 1, index: 0, .. } => {
            let m = error.to_string();
            assert!(m.starts_with("etcd at http://127.0.0.1:2: cannot connect") && !m.contains("Consul"), "{m}");
        }
        other => panic!("{other:?}"),
    }
}

proptest! {
    #[test]
    fn no_input_makes_the_decoders_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_v2_keys("upstreams/app", &bytes);
        let _ = decode_v3_range(&bytes);
        let _ = decode_v3_watch(&bytes);
        let _ = v2_error(&bytes);
    }

    #[test]
    fn no_mutated_fixture_makes_the_decoders_panic(pos in 0usize..4096, byte in any::<u8>()) {
        for name in ["etcd_v2_keys.json", "etcd_v3_range.json", "etcd_v3_watch.jsonl"] {
            let mut b = fixture(name);
            let i = pos % b.len();
            b[i] = byte;
            let _ = decode_v2_keys("upstreams/app", &b);
            let _ = decode_v3_range(&b);
            for line in b.split(|&c| c == b'\n') {
                let _ = decode_v3_watch(line);
            }
        }
    }
}
