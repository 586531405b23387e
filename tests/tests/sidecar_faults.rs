//! The sidecar under faults an operator meets, against real Consul 1.8.7 (sidecar/README.md,
//! Reliability): an answered API call survives `kill -9` while Consul is down; a second
//! sidecar with the same node id refuses to reconcile; ownership records that point outside
//! the sidecar's own entries are never acted on; the API refuses unsafe ids, addresses and
//! check URLs; one endpoint Consul keeps refusing does not hold the others; a task that dies
//! stops the process.
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use upsync_tests::consul::{ClusterMember, Consul, ConsulOptions};
use upsync_tests::net::free_port;
use upsync_tests::sidecar::{eventually, ConsulView, Sidecar, SidecarOpts};
use upsync_tests::TestDir;

fn no_engine(node: &str, dir: &TestDir) -> SidecarOpts {
    SidecarOpts::new(node, &dir.join("no-engine.sock")).arg("--no-engine")
}

/// A single Consul server keeping its data across a restart (a dev agent would come back
/// empty and prove nothing about durability).
fn persistent_consul(dir: &TestDir) -> Consul {
    let opts = ConsulOptions {
        node_name: Some("upsync-persistent".into()),
        cluster: Some(ClusterMember { bootstrap_expect: 1, join: Vec::new(), server: true }),
        ..Default::default()
    };
    Consul::start_with(&dir.subdir("consul"), opts)
}

fn pending_calls(sidecar: &Sidecar) -> usize {
    let file = sidecar.state_dir().join(format!("{}.pending.json", sidecar.opts.node_id));
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let v: Value = serde_json::from_str(&text).expect("pending calls JSON");
    v["pending"].as_object().map(|m| m.len()).expect("pending map")
}

#[test]
fn answered_calls_survive_a_sidecar_crash_while_consul_is_down() {
    let dir = TestDir::new("sidecar_durable_calls");
    let mut consul = persistent_consul(&dir);
    let mut sidecar = Sidecar::start(dir.path(), &consul.http_addr(), no_engine("node-a", &dir));
    sidecar.api_json("PUT", "/v1/endpoints/api/keep", Some(r#"{"address":"10.0.0.1","port":80}"#), 201);
    sidecar.api_json("PUT", "/v1/endpoints/api/gone", Some(r#"{"address":"10.0.0.2","port":80}"#), 201);
    {
        let view = ConsulView(&consul);
        eventually("keep and gone registered", || view.service_ids("api") == ["gone", "keep"]);
    }

    consul.stop();
    // Answered while Consul is down, then the sidecar dies before it could apply them.
    assert_eq!(sidecar.api_json("DELETE", "/v1/endpoints/api/gone", None, 200)["result"], "deleted");
    sidecar.api_json("PUT", "/v1/endpoints/api/new", Some(r#"{"address":"10.0.0.3","port":80}"#), 201);
    sidecar.kill();
    sidecar.restart();
    consul.restart();

    let view = ConsulView(&consul);
    eventually("the PUT applied and the DELETE kept after the restart", || {
        view.service_ids("api") == ["keep", "new"]
            && view.kv_json("upstreams/api/10.0.0.3:80").is_some()
            && view.kv_json("upstreams/api/10.0.0.2:80").is_none()
    });
    eventually("the sidecar in step", || {
        let list = sidecar.api_json("GET", "/v1/endpoints/api", None, 200);
        let ids: Vec<&str> = list.as_array().unwrap().iter().filter_map(|e| e["id"].as_str()).collect();
        list.as_array().unwrap().iter().all(|e| e["synced"] == true) && ids.len() == 2 && !ids.contains(&"gone")
    });
    eventually("nothing pending any more", || pending_calls(&sidecar) == 0);
    assert!(consul.kv_get("upsync-sidecar/node-a/endpoints/gone").is_none(), "the deleted endpoint's record came back");
}

/// One raw HTTP/1.1 request (no URL normalisation: `..` reaches the server as sent).
fn raw_request(port: u16, method: &str, path: &str, body: &str) -> (u16, Value) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the sidecar");
    write!(s, "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    let status: u16 = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("no status: {out}"));
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::String(body.to_string())))
}

#[test]
fn the_api_refuses_unsafe_ids_addresses_and_check_urls_by_name() {
    let dir = TestDir::new("sidecar_refused_input");
    let consul = Consul::start(dir.path());
    let view = ConsulView(&consul);
    let sidecar = Sidecar::start(dir.path(), &consul.http_addr(), no_engine("node-a", &dir).strict_addresses());
    let ok = r#"{"address":"10.0.0.1","port":80}"#;
    let paths = [
        ("/v1/endpoints/api/..", "id"),
        ("/v1/endpoints/api/.", "id"),
        ("/v1/endpoints/api/%2E%2E", "id"),
        ("/v1/endpoints/api/a%2Fb", "id"),
        ("/v1/endpoints/api/a%2fb", "id"),
        ("/v1/endpoints/api/a%00b", "id"),
        ("/v1/endpoints/api/a%0Ab", "id"),
        ("/v1/endpoints/../a1", "service"),
        ("/v1/endpoints/a%2Fb/a1", "service"),
    ];
    for (path, field) in paths {
        for method in ["PUT", "DELETE"] {
            let (status, r) = raw_request(sidecar.api_port, method, path, ok);
            assert_eq!((status, r["field"].as_str()), (400, Some(field)), "{method} {path}: {r}");
        }
    }
    let bodies = [
        (r#"{"address":"127.0.0.1","port":80}"#, "address"),
        (r#"{"address":"::1","port":80}"#, "address"),
        (r#"{"address":"localhost","port":80}"#, "address"),
        (r#"{"address":"169.254.7.7","port":80}"#, "address"),
        (r#"{"address":"fe80::1","port":80}"#, "address"),
        (r#"{"address":"169.254.169.254","port":80}"#, "address"),
        (r#"{"address":"fd00:ec2::254","port":80}"#, "address"),
        (r#"{"address":"10.0.0.1","port":80,"check":{"http":"file:///etc/passwd"}}"#, "check.http"),
        (r#"{"address":"10.0.0.1","port":80,"check":{"http":"gopher://10.0.0.1:70/"}}"#, "check.http"),
        (r#"{"address":"10.0.0.1","port":80,"check":{"http":"http://169.254.169.254/latest/meta-data/"}}"#, "check.http"),
        (r#"{"address":"10.0.0.1","port":80,"check":{"http":"http://127.0.0.1:8500/v1/acl/tokens"}}"#, "check.http"),
    ];
    for (body, field) in bodies {
        let r = sidecar.api_json("PUT", "/v1/endpoints/api/a1", Some(body), 400);
        assert_eq!(r["field"], field, "{body}: {r}");
        assert!(r["error"].as_str().is_some_and(|e| e.starts_with(field) && e.contains("allow")), "{body}: {r}");
    }
    // Accepted input still works, and nothing refused reached Consul.
    sidecar.api_json("PUT", "/v1/endpoints/api/a1", Some(r#"{"address":"10.0.0.1","port":80,"check":{"http":"/health"}}"#), 201);
    eventually("a1 registered", || view.service_ids("api") == ["a1"]);
    assert_eq!(consul.kv_keys("upstreams/"), ["upstreams/api/10.0.0.1:80"]);

    // Listening beyond loopback without a token: refused at start unless said explicitly
    // (checked before anything is bound).
    let out = Command::new(upsync_tests::paths::workspace_bin("upsync-sidecar"))
        .args(["--consul", &consul.http_addr(), "--no-engine", "--advertise-ip", "127.0.0.1", "--node-id", "node-x"])
        .args(["--listen", &format!("0.0.0.0:{}", free_port())])
        .arg("--state-dir")
        .arg(dir.join("state-x"))
        .output()
        .expect("running upsync-sidecar");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--listen") && stderr.contains("--insecure-no-token") && stderr.contains("--api-token-file"), "{stderr}");
}

/// A proxy in front of real Consul that answers 503 to every request mentioning `needle` (the
/// KV transaction and the registration of one service) and passes everything else through.
/// Hand-written (one request per connection, `Connection: close`): it must look into each
/// request and fail some, which no proxy crate in the workspace does; the rest is real Consul.
fn fault_proxy(upstream: u16, needle: &'static str) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("proxy listener");
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = proxy_one(conn, upstream, needle);
            });
        }
    });
    port
}

fn proxy_one(mut client: TcpStream, upstream: u16, needle: &str) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        let n = client.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let length: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = client.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf);
    if text.contains(needle) {
        let body = "injected fault";
        write!(client, "HTTP/1.1 503 Service Unavailable\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())?;
        return Ok(());
    }
    // One request per connection: `Connection: close` both ways.
    let mut new_head: String =
        head.trim_end().lines().filter(|l| !l.to_ascii_lowercase().starts_with("connection:")).map(|l| format!("{l}\r\n")).collect();
    new_head.push_str("Connection: close\r\n\r\n");
    let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
    up.write_all(new_head.as_bytes())?;
    up.write_all(&buf[head_end..])?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer)?;
    client.write_all(&answer)?;
    Ok(())
}

#[test]
fn an_endpoint_consul_keeps_refusing_does_not_hold_the_others() {
    let dir = TestDir::new("sidecar_stuck_endpoint");
    let consul = Consul::start_with(dir.path(), ConsulOptions::with_acl());
    // The token may write the KV entries, its records, sessions, and the services `good` and
    // `stuck`, but not the service `denied`.
    let token = consul.create_token(
        "sidecar-partial",
        r#"key_prefix "" { policy = "write" }
           service "good" { policy = "write" }
           service "stuck" { policy = "write" }
           service_prefix "" { policy = "read" }
           node_prefix "" { policy = "read" }
           session_prefix "" { policy = "write" }"#,
    );
    let token_file = dir.join("consul-token");
    std::fs::write(&token_file, &token).unwrap();
    // Consul answers 503 to every write about `stuck` (its KV transaction, its registration).
    let proxy = fault_proxy(consul.ports.http, "stuck");
    let opts = no_engine("node-a", &dir).arg("--consul-token-file").arg(token_file.to_str().unwrap());
    let sidecar = Sidecar::start(dir.path(), &format!("127.0.0.1:{proxy}"), opts);
    let view = ConsulView(&consul);

    // The refused ones first: they are at the head of the queue.
    sidecar.api_json("PUT", "/v1/endpoints/stuck/s1", Some(r#"{"address":"10.0.0.9","port":80}"#), 201);
    sidecar.api_json("PUT", "/v1/endpoints/denied/d1", Some(r#"{"address":"10.0.0.8","port":80}"#), 201);
    sidecar.api_json("PUT", "/v1/endpoints/good/g1", Some(r#"{"address":"10.0.0.7","port":80}"#), 201);
    eventually("good registered although stuck and denied are refused", || {
        view.service_ids("good") == ["g1"] && view.kv_json("upstreams/good/10.0.0.7:80").is_some()
    });
    eventually("the refusals shown on their endpoints", || {
        let list = sidecar.api_json("GET", "/v1/endpoints", None, 200);
        let err = |id: &str| list.as_array().unwrap().iter().find(|e| e["id"] == id).map(|e| e["error"].clone()).unwrap_or(Value::Null);
        err("s1").as_str().is_some_and(|e| e.contains("503")) && err("d1").as_str().is_some_and(|e| e.contains("403"))
    });
    // Later changes of the others are not held either.
    sidecar.api_json("PUT", "/v1/endpoints/good/g2", Some(r#"{"address":"10.0.0.6","port":80}"#), 201);
    eventually("g2 registered", || view.service_ids("good") == ["g1", "g2"]);
    assert!(view.service_ids("stuck").is_empty() && view.service_ids("denied").is_empty());
    assert!(sidecar.log().contains("retrying it alone"), "the stuck endpoint's retries are not logged");
}

/// An ownership record as the sidecar writes it.
fn record(id: &str, service: &str, address: &str, source: Value, kv_key: &str) -> String {
    json!({
        "spec": {"service": service, "id": id, "address": address, "port": 80, "protocol": "tcp", "weight": 1,
                 "max_fails": 2, "fail_timeout": 10, "backup": false, "down": false, "tags": [], "meta": {}, "source": source},
        "draining": false,
        "kv_key": kv_key,
    })
    .to_string()
}

#[test]
fn a_second_sidecar_with_the_same_node_id_refuses_to_reconcile() {
    let dir = TestDir::new("sidecar_same_node_id");
    let consul = Consul::start(dir.path());
    // Host A runs a container (its engine is not listed yet, so A keeps the entry; a real
    // engine would list it).
    let a = Sidecar::start(dir.path(), &consul.http_addr(), SidecarOpts::new("node-a", &dir.join("engine-a.sock")));
    // A reconciles (only the lock's holder does).
    eventually("A reconciled", || a.healthz()["consul"]["last_reconcile_seconds_ago"].as_u64().is_some());
    let container = json!({"kind": "container", "id": "0123456789ab", "name": "web1"});
    consul.kv_put("upstreams/web/10.0.0.7:80", r#"{"weight":1,"max_fails":2,"fail_timeout":10,"down":0,"backup":0}"#);
    consul.kv_put(
        "upsync-sidecar/node-a/endpoints/node-a:web1:80",
        &record("node-a:web1:80", "web", "10.0.0.7", container, "upstreams/web/10.0.0.7:80"),
    );

    // Host B is set up with the same node id (a cloned image, a reused host name). It runs no
    // such container: reconciling would delete A's entry.
    let b_dir = dir.subdir("host-b");
    let b = Sidecar::start(&b_dir, &consul.http_addr(), no_engine("node-a", &dir));
    // B's API still answers (calls are recorded and wait for the lock).
    b.api_json("PUT", "/v1/endpoints/api/b1", Some(r#"{"address":"10.0.0.5","port":80}"#), 201);
    // Several of B's resync periods (2s): B must not have touched anything.
    std::thread::sleep(Duration::from_secs(5));
    assert!(consul.kv_get("upstreams/web/10.0.0.7:80").is_some(), "B deleted A's entry:\n{}", b.log());
    assert!(consul.kv_get("upsync-sidecar/node-a/endpoints/node-a:web1:80").is_some(), "B deleted A's record");
    assert!(consul.kv_get("upstreams/api/10.0.0.5:80").is_none(), "B wrote without the lock");
    let h = b.healthz();
    assert_eq!((&h["status"], &h["lock"]["state"]), (&json!("conflict"), &json!("conflict")), "{h}");
    assert!(h["lock"]["error"].as_str().is_some_and(|e| e.contains("another upsync-sidecar") && e.contains("--node-id")), "{h}");
    assert_eq!(a.healthz()["lock"]["state"], "held");
    assert!(b.log().contains("another upsync-sidecar holds the lock"), "{}", b.log());

    // A stops (releasing the lock): B takes over as the node's only sidecar.
    drop(a);
    eventually("B holds the lock", || b.healthz()["lock"]["state"] == "held");
    eventually("B's call applied", || consul.kv_get("upstreams/api/10.0.0.5:80").is_some());
}

#[test]
fn invalid_ownership_records_are_reported_and_never_acted_on() {
    let dir = TestDir::new("sidecar_invalid_records");
    let consul = Consul::start(dir.path());
    let view = ConsulView(&consul);
    // Another node's service, and a KV entry outside the sidecar's prefix.
    consul.register_service(&json!({"ID": "x1", "Name": "web", "Address": "10.0.0.5", "Port": 80, "Meta": {"upsync-node": "node-b"}}));
    consul.kv_put("other/secret", "keep");
    let container = json!({"kind": "container", "id": "0123456789ab", "name": "web2"});
    // Records under node-a that point at them (written by mistake, or by someone who may
    // write the records but not the rest).
    consul.kv_put(
        "upsync-sidecar/node-a/endpoints/x1",
        &record("x1", "web", "10.0.0.5", json!({"kind": "api"}), "upstreams/web/10.0.0.5:80"),
    );
    consul.kv_put("upsync-sidecar/node-a/endpoints/e2", &record("e2", "web", "10.0.0.6", container, "other/secret"));
    consul.kv_put(
        "upsync-sidecar/node-a/endpoints/e3",
        &record("e4", "web", "10.0.0.8", json!({"kind": "api"}), "upstreams/web/10.0.0.8:80"),
    );

    let sidecar = Sidecar::start(dir.path(), &consul.http_addr(), no_engine("node-a", &dir));
    // Two reconciles (resync 2s), then nothing must have been acted on.
    let reconciled = || sidecar.healthz()["consul"]["last_reconcile_seconds_ago"].as_u64().is_some();
    eventually("a first reconcile", reconciled);
    std::thread::sleep(Duration::from_millis(2500));
    eventually("another reconcile", reconciled);
    assert_eq!(consul.kv_get("other/secret").as_deref(), Some("keep"), "a KV entry outside the prefix was deleted");
    assert_eq!(view.services()["x1"]["Meta"]["upsync-node"], "node-b", "another node's service was taken over");
    assert!(consul.kv_get("upstreams/web/10.0.0.5:80").is_none() && consul.kv_get("upstreams/web/10.0.0.8:80").is_none());
    for id in ["x1", "e2", "e3"] {
        assert!(consul.kv_get(&format!("upsync-sidecar/node-a/endpoints/{id}")).is_some(), "record {id} removed");
    }
    assert!(sidecar.api_json("GET", "/v1/endpoints", None, 200).as_array().unwrap().is_empty());
    let reported = sidecar.healthz()["invalid_records"].clone();
    assert_eq!(reported.as_array().map(|v| v.len()), Some(3), "{reported}");
    let reported = reported.to_string();
    assert!(reported.contains("node-b") && reported.contains("outside") && reported.contains("describes endpoint"), "{reported}");
    assert!(sidecar.log().contains("ownership record not used"), "{}", sidecar.log());
}

#[test]
fn a_task_that_panics_stops_the_process_with_an_error() {
    let dir = TestDir::new("sidecar_task_panics");
    let consul = Consul::start(dir.path());
    for task in ["applier", "engine", "lock"] {
        let mut opts = SidecarOpts::new(&format!("node-{task}"), &dir.join("no-engine.sock"));
        // Test hook (sidecar/README.md): the named task panics 3 s after start.
        opts.env.push(("UPSYNC_SIDECAR_TEST_PANIC".into(), task.into()));
        let mut sidecar = Sidecar::start(dir.path(), &consul.http_addr(), opts);
        let status = sidecar.wait_exit(Duration::from_secs(30)).unwrap_or_else(|| {
            panic!("the sidecar kept running after its {task} task panicked:\n{}", sidecar.log());
        });
        assert!(!status.success(), "{task}: exit status {status}");
        let log = sidecar.log();
        assert!(log.contains(&format!("the {task} task panicked")) && log.contains("restarts the sidecar"), "{log}");
    }
}
