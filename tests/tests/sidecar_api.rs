//! The sidecar's scheduler API against a real Consul: endpoints PUT are registered (agent
//! service + KV), idempotently; bad requests get a 4xx naming the field; DELETE removes, with
//! an optional drain; a bearer token can be required; endpoints survive a sidecar crash
//! because they are kept in Consul; Consul ACL tokens work and are never logged. These sidecars run without a container engine
//! (`--no-engine`), as on a host whose scheduler runs no containers.
use serde_json::{json, Value};
use upsync_tests::consul::{Consul, ConsulOptions};
use upsync_tests::net::http_request;
use upsync_tests::sidecar::{eventually, ConsulView, Sidecar, SidecarOpts};
use upsync_tests::TestDir;

fn kv_index(consul: &Consul, key: &str) -> u64 {
    let (status, body) = consul.api("GET", &format!("/v1/kv/{key}"), None).expect("KV get");
    assert_eq!(status, 200, "{key}: {body}");
    let v: Value = serde_json::from_str(&body).expect("KV JSON");
    v[0]["ModifyIndex"].as_u64().expect("ModifyIndex")
}

#[test]
fn api_round_trip_with_validation_drain_and_token() {
    let dir = TestDir::new("sidecar_api_round_trip");
    let consul = Consul::start(dir.path());
    let view = ConsulView(&consul);
    let mut opts = SidecarOpts::new("node-a", &dir.join("no-engine.sock")).arg("--no-engine");
    opts.api_token = Some("s3cret-api-token".into());
    let sidecar = Sidecar::start(dir.path(), &consul.http_addr(), opts);

    // Create, then the same PUT again changes nothing.
    let body = r#"{"address":"10.1.2.3","port":8080,"weight":2,"tags":["blue"],"meta":{"team":"core"},
                   "check":{"ttl":"30s"}}"#;
    let r = sidecar.api_json("PUT", "/v1/endpoints/api/a1", Some(body), 201);
    assert_eq!(r["result"], "created");
    assert_eq!(r["endpoint"]["kv_key"], "upstreams/api/10.1.2.3:8080");
    eventually("KV entry", || view.kv_json("upstreams/api/10.1.2.3:8080").is_some());
    assert_eq!(
        view.kv_json("upstreams/api/10.1.2.3:8080"),
        Some(json!({"weight": 2, "max_fails": 2, "fail_timeout": 10, "down": 0, "backup": 0}))
    );
    eventually("agent service", || view.service_ids("api") == vec!["a1".to_string()]);
    let svc = view.services()["a1"].clone();
    assert_eq!((svc["Address"].as_str(), svc["Port"].as_u64()), (Some("10.1.2.3"), Some(8080)));
    assert_eq!(svc["Meta"]["team"], "core");
    assert_eq!(svc["Meta"]["upsync-source"], "api");
    assert!(view.checks().contains_key("service:a1"), "TTL check missing");
    let index = kv_index(&consul, "upstreams/api/10.1.2.3:8080");
    assert_eq!(sidecar.api_json("PUT", "/v1/endpoints/api/a1", Some(body), 200)["result"], "unchanged");
    eventually("synced", || sidecar.api_json("GET", "/v1/endpoints/api", None, 200)[0]["synced"] == true);
    assert_eq!(kv_index(&consul, "upstreams/api/10.1.2.3:8080"), index, "an unchanged PUT rewrote the KV entry");

    // Update.
    let r = sidecar.api_json("PUT", "/v1/endpoints/api/a1", Some(r#"{"address":"10.1.2.3","port":8080,"weight":5}"#), 200);
    assert_eq!(r["result"], "updated");
    eventually("weight 5 in KV", || view.kv_json("upstreams/api/10.1.2.3:8080").is_some_and(|v| v["weight"] == 5));
    eventually("weight 5 in the service", || view.services()["a1"]["Weights"]["Passing"] == 5);

    // Validation: 400 naming the field; conflicts: 409.
    let bad = [
        ("/v1/endpoints/api/a2", r#"{"address":"10.1.2.4"}"#, 400, "port"),
        ("/v1/endpoints/api/a2", r#"{"port":99999}"#, 400, "port"),
        ("/v1/endpoints/api/a2", r#"{"port":80,"address":"300.1.1.1"}"#, 400, "address"),
        ("/v1/endpoints/api/a2", r#"{"port":80,"weight":0}"#, 400, "weight"),
        ("/v1/endpoints/api/a2", r#"{"port":80,"check":{"http":"/x","ttl":"5s"}}"#, 400, "check"),
        ("/v1/endpoints/api/a2", r#"{"port":80,"colour":"red"}"#, 400, "colour"),
        ("/v1/endpoints/api/a2", r#"not json"#, 400, "body"),
        ("/v1/endpoints/bad.name/a2", r#"{"port":80}"#, 400, "service"),
        ("/v1/endpoints/api/a2", r#"{"address":"10.1.2.3","port":8080}"#, 409, "address"),
        ("/v1/endpoints/web/a1", r#"{"port":80}"#, 409, "id"),
    ];
    for (path, body, status, field) in bad {
        let r = sidecar.api_json("PUT", path, Some(body), status);
        assert_eq!(r["field"], field, "PUT {path} {body}: {r}");
        assert!(r["error"].as_str().is_some_and(|e| e.starts_with(field)), "PUT {path} {body}: {r}");
    }
    assert_eq!(sidecar.api("POST", "/v1/endpoints/api/a1", Some("{}")).0, 405);
    assert_eq!(sidecar.api("GET", "/v2/nothing", None).0, 404);
    assert!(view.service_ids("api") == vec!["a1".to_string()], "a refused PUT registered something");

    // The token: required on /v1, not on /healthz.
    let url = sidecar.url("/v1/endpoints");
    let (status, body) = http_request("GET", &url, &[], None).expect("request");
    assert_eq!(status, 401, "{body}");
    let (status, _) = http_request("GET", &url, &[("Authorization", "Bearer wrong")], None).expect("request");
    assert_eq!(status, 401);
    assert_eq!(http_request("GET", &sidecar.url("/healthz"), &[], None).expect("healthz").0, 200);
    assert!(!sidecar.log().contains("s3cret-api-token"), "the token appears in the log");
    let health = sidecar.healthz();
    assert_eq!((health["status"].as_str(), health["engine"]["enabled"].as_bool()), (Some("ok"), Some(false)), "{health}");

    // DELETE with a drain: marked down (KV down=1, service maintenance) and kept; a DELETE
    // without drain then removes it at once.
    sidecar.api_json("PUT", "/v1/endpoints/api/a2", Some(r#"{"address":"10.1.2.4","port":8080}"#), 201);
    eventually("a2 registered", || view.kv_json("upstreams/api/10.1.2.4:8080").is_some());
    let r = sidecar.api_json("DELETE", "/v1/endpoints/api/a2?drain=2h", None, 400);
    assert_eq!(r["field"], "drain", "{r}");
    let r = sidecar.api_json("DELETE", "/v1/endpoints/api/a2?drain=5m", None, 202);
    assert_eq!(r["result"], "draining");
    eventually("a2 marked down", || view.kv_json("upstreams/api/10.1.2.4:8080").is_some_and(|v| v["down"] == 1));
    eventually("a2 in maintenance", || view.in_maintenance("a2"));
    let listed = sidecar.api_json("GET", "/v1/endpoints/api", None, 200);
    assert_eq!(listed[1]["state"], "draining", "{listed}");
    assert_eq!(sidecar.api_json("DELETE", "/v1/endpoints/api/a2", None, 200)["result"], "deleted");
    eventually("a2 removed", || {
        view.kv_json("upstreams/api/10.1.2.4:8080").is_none() && !view.service_ids("api").contains(&"a2".to_string())
    });
    // A short drain runs out by itself.
    sidecar.api_json("PUT", "/v1/endpoints/api/a3", Some(r#"{"address":"10.1.2.5","port":8080}"#), 201);
    eventually("a3 registered", || view.kv_json("upstreams/api/10.1.2.5:8080").is_some());
    sidecar.api_json("DELETE", "/v1/endpoints/api/a3?drain=1s", None, 202);
    eventually("a3 removed after its drain", || {
        view.kv_json("upstreams/api/10.1.2.5:8080").is_none() && !view.service_ids("api").contains(&"a3".to_string())
    });

    // DELETE at once; again is harmless.
    assert_eq!(sidecar.api_json("DELETE", "/v1/endpoints/api/a1", None, 200)["result"], "deleted");
    assert_eq!(sidecar.api_json("DELETE", "/v1/endpoints/api/a1", None, 200)["result"], "absent");
    assert_eq!(sidecar.api_json("DELETE", "/v1/endpoints/api/a1?drain=soon", None, 400)["field"], "drain");
    eventually("a1 removed", || view.kv_json("upstreams/api/10.1.2.3:8080").is_none() && view.service_ids("api").is_empty());
    eventually("ownership records removed", || consul.kv_keys("upsync-sidecar/node-a/endpoints/").is_empty());
    assert_eq!(sidecar.api_json("GET", "/v1/endpoints", None, 200), json!([]));
}

#[test]
fn api_endpoints_survive_a_sidecar_crash_and_other_nodes_are_left_alone() {
    // Also: the service output can be turned off (node-b).
    let dir = TestDir::new("sidecar_api_restart");
    let consul = Consul::start(dir.path());
    let view = ConsulView(&consul);
    let mut a = Sidecar::start(dir.path(), &consul.http_addr(), SidecarOpts::new("node-a", &dir.join("none-a.sock")).arg("--no-engine"));
    // node-b writes only the KV output.
    let b = Sidecar::start(
        dir.path(),
        &consul.http_addr(),
        SidecarOpts::new("node-b", &dir.join("none-b.sock")).arg("--no-engine").arg("--no-services"),
    );
    // Something nobody's sidecar wrote.
    consul.kv_put("upstreams/api/10.9.9.9:80", r#"{"weight":1}"#);

    a.api_json("PUT", "/v1/endpoints/api/a1", Some(r#"{"address":"10.1.0.1","port":80,"check":{"ttl":"1m"}}"#), 201);
    a.api_json("PUT", "/v1/endpoints/api/a2", Some(r#"{"address":"10.1.0.2","port":80,"backup":true}"#), 201);
    b.api_json("PUT", "/v1/endpoints/api/b1", Some(r#"{"address":"10.2.0.1","port":80}"#), 201);
    eventually("all three in KV", || view.kv_entries("upstreams/api/").len() == 4);
    eventually("node-a's two services", || view.service_ids("api") == vec!["a1".to_string(), "a2".to_string()]);
    let indexes: Vec<u64> = ["10.1.0.1:80", "10.1.0.2:80", "10.2.0.1:80", "10.9.9.9:80"]
        .iter()
        .map(|k| kv_index(&consul, &format!("upstreams/api/{k}")))
        .collect();

    // A crash: the registrations stay; the restarted sidecar reads its endpoints back.
    a.kill();
    a.restart();
    eventually("a1 and a2 listed again", || {
        let list = a.api_json("GET", "/v1/endpoints/api", None, 200);
        list.as_array().is_some_and(|l| l.len() == 2 && l.iter().all(|e| e["synced"] == true))
    });
    let list = a.api_json("GET", "/v1/endpoints/api", None, 200);
    assert_eq!(list[1]["backup"], true, "{list}");
    assert_eq!(list[0]["check"]["kind"]["ttl"], "60s", "{list}");
    // Nothing was rewritten: reconciling found Consul in step.
    let after: Vec<u64> = ["10.1.0.1:80", "10.1.0.2:80", "10.2.0.1:80", "10.9.9.9:80"]
        .iter()
        .map(|k| kv_index(&consul, &format!("upstreams/api/{k}")))
        .collect();
    assert_eq!(after, indexes, "KV entries were rewritten by the restart");

    // The restarted sidecar still manages them; node-b's endpoint and the foreign key stay.
    a.api_json("DELETE", "/v1/endpoints/api/a1", None, 200);
    eventually("a1 removed", || {
        view.kv_json("upstreams/api/10.1.0.1:80").is_none() && !view.service_ids("api").contains(&"a1".to_string())
    });
    assert!(view.kv_json("upstreams/api/10.2.0.1:80").is_some());
    assert!(view.kv_json("upstreams/api/10.9.9.9:80").is_some());
    assert_eq!(view.service_ids("api"), vec!["a2".to_string()], "node-b (--no-services) registered a service");
    assert_eq!(b.api_json("GET", "/v1/endpoints", None, 200).as_array().map(Vec::len), Some(1));
}

#[test]
fn with_acls_a_least_privilege_token_works_a_refused_one_is_reported_and_neither_is_logged() {
    let dir = TestDir::new("sidecar_acl");
    let consul = Consul::start_with(dir.path(), ConsulOptions::with_acl());
    let view = ConsulView(&consul);
    let rules = r#"
        service_prefix "" { policy = "write" }
        key_prefix "upstreams/" { policy = "write" }
        key_prefix "upsync-sidecar/node-a/" { policy = "write" }
        node_prefix "" { policy = "read" }
    "#;
    let token = consul.create_token("upsync-sidecar-node-a", rules);
    std::fs::write(dir.join("token-a"), &token).unwrap();
    std::fs::write(dir.join("token-b"), "00000000-1111-2222-3333-444444444444").unwrap();
    let with_token = |node: &str, file: &str| {
        SidecarOpts::new(node, &dir.join("none.sock")).arg("--no-engine").arg("--consul-token-file").arg(dir.join(file).to_str().unwrap())
    };
    let a = Sidecar::start(dir.path(), &consul.http_addr(), with_token("node-a", "token-a"));
    let b = Sidecar::start(dir.path(), &consul.http_addr(), with_token("node-b", "token-b"));

    a.api_json("PUT", "/v1/endpoints/api/a1", Some(r#"{"address":"10.0.0.1","port":80,"check":{"ttl":"1m"}}"#), 201);
    eventually("a1 registered with the least-privilege token", || {
        view.kv_json("upstreams/api/10.0.0.1:80").is_some() && view.service_ids("api") == vec!["a1".to_string()]
    });
    a.api_json("DELETE", "/v1/endpoints/api/a1?drain=5m", None, 202);
    eventually("a1 drained (maintenance needs service:write)", || view.in_maintenance("a1"));
    eventually("node-a healthy", || a.healthz()["status"] == "ok");

    // An unknown token: the API still answers, and says what is wrong.
    b.api_json("PUT", "/v1/endpoints/api/b1", Some(r#"{"address":"10.0.0.2","port":80}"#), 201);
    eventually("the refusal reported on the endpoint", || {
        b.api_json("GET", "/v1/endpoints/api", None, 200)[0]["error"].as_str().is_some_and(|e| e.contains("ACL token rejected"))
    });
    assert!(b.healthz()["consul"]["error"].as_str().is_some_and(|e| e.contains("ACL")), "{}", b.healthz());
    assert!(view.kv_json("upstreams/api/10.0.0.2:80").is_none());
    for (s, secret) in [(&a, token.as_str()), (&b, "00000000-1111-2222-3333-444444444444")] {
        assert!(!s.log().contains(secret), "an ACL token appears in the log of {}", s.opts.node_id);
    }
}
