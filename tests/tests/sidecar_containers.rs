//! upsync-sidecar with real containers: podman's Docker-compatible API, a real Consul dev
//! agent. A container that starts is registered (agent service with its check + upsync KV
//! entry) with its labels' metadata; SERVICE_IGNORE is honoured; a stopped container is
//! drained (marked down while it still runs) and then deregistered; a killed one is
//! deregistered.
use serde_json::json;
use upsync_tests::consul::Consul;
use upsync_tests::net::{free_port, http_get};
use upsync_tests::podman::{Httpd, Net, Podman};
use upsync_tests::sidecar::{eventually, ConsulView, Sidecar, SidecarOpts};
use upsync_tests::TestDir;

#[test]
fn started_containers_are_registered_with_their_labels_and_ignored_ones_are_not() {
    let dir = TestDir::new("sidecar_start_registers");
    let consul = Consul::start(dir.path());
    let podman = Podman::start(dir.path());
    let sidecar = Sidecar::start(dir.path(), &consul.http_addr(), SidecarOpts::new("node-a", &podman.socket));
    let view = ConsulView(&consul);

    // Published port (slirp4netns), metadata from labels and env (labels win).
    let published = Httpd::new("web-pub", Net::Publish { host_port: free_port() })
        .label("SERVICE_NAME", "web")
        .label("SERVICE_TAGS", "blue,v2")
        .label("SERVICE_WEIGHT", "3")
        .env("SERVICE_WEIGHT", "9")
        .env("SERVICE_MAX_FAILS", "4")
        .label("SERVICE_VERSION", "2.1")
        .label("SERVICE_CHECK_HTTP", "/")
        .label("SERVICE_CHECK_INTERVAL", "1s");
    // Host network: the port comes from its SERVICE_<port>_NAME label.
    let port = free_port();
    let host = Httpd::new("web-host", Net::Host { port }).label(&format!("SERVICE_{port}_NAME"), "web");
    let ignored = Httpd::new("web-ignored", Net::Host { port: free_port() }).label("SERVICE_NAME", "web").label("SERVICE_IGNORE", "true");
    for c in [&published, &host, &ignored] {
        podman.run_httpd(c);
    }
    for c in [&published, &host] {
        eventually(&format!("{} answering", c.name), || http_get(&format!("http://{}/", c.host_port())).is_ok_and(|(s, _)| s == 200));
    }

    let pub_key = format!("upstreams/web/{}", published.host_port());
    let host_key = format!("upstreams/web/{}", host.host_port());
    eventually("both containers in KV", || view.kv_entries("upstreams/web/").len() == 2);
    assert_eq!(
        view.kv_json(&pub_key),
        Some(json!({"weight": 3, "max_fails": 4, "fail_timeout": 10, "down": 0, "backup": 0})),
        "KV value of the published container"
    );
    assert_eq!(view.kv_json(&host_key), Some(json!({"weight": 1, "max_fails": 2, "fail_timeout": 10, "down": 0, "backup": 0})));

    let ids = view.service_ids("web");
    assert_eq!(ids, vec!["node-a:web-host:".to_string() + &port.to_string(), "node-a:web-pub:80".to_string()]);
    let services = view.services();
    let svc = &services["node-a:web-pub:80"];
    assert_eq!(svc["Address"], "127.0.0.1");
    assert_eq!(svc["Port"].as_u64().map(|p| p.to_string()), published.host_port().split(':').nth(1).map(str::to_string));
    let tags: Vec<&str> = svc["Tags"].as_array().unwrap().iter().filter_map(|t| t.as_str()).collect();
    for t in ["blue", "v2", "weight=3", "max_fails=4", "upsync-node=node-a"] {
        assert!(tags.contains(&t), "tag {t} missing: {tags:?}");
    }
    assert_eq!(svc["Meta"]["version"], "2.1");
    assert_eq!(svc["Meta"]["upsync-node"], "node-a");
    assert_eq!(svc["Meta"]["upsync-container"], "web-pub");
    assert_eq!(svc["Weights"]["Passing"], 3);

    // The HTTP check from SERVICE_CHECK_HTTP probes the container and passes.
    eventually("the HTTP check passing", || view.checks().get("service:node-a:web-pub:80").is_some_and(|c| c["Status"] == "passing"));

    // The ignored container is nowhere, and the API lists exactly the two others.
    assert!(!services.keys().any(|k| k.contains("web-ignored")), "{services:?}");
    let listed = sidecar.api_json("GET", "/v1/endpoints/web", None, 200);
    let mut names: Vec<String> =
        listed.as_array().unwrap().iter().map(|e| e["source"]["name"].as_str().unwrap_or("").to_string()).collect();
    names.sort();
    assert_eq!(names, vec!["web-host", "web-pub"]);
    eventually("both endpoints synced", || {
        sidecar.api_json("GET", "/v1/endpoints/web", None, 200).as_array().unwrap().iter().all(|e| e["synced"] == true)
    });
}

#[test]
fn a_stopped_container_is_drained_while_it_still_runs_then_deregistered() {
    let dir = TestDir::new("sidecar_stop_drains");
    let consul = Consul::start(dir.path());
    let podman = Podman::start(dir.path());
    let _sidecar = Sidecar::start(dir.path(), &consul.http_addr(), SidecarOpts::new("node-a", &podman.socket).arg("--drain").arg("30s"));
    let view = ConsulView(&consul);
    let port = free_port();
    // httpd is PID 1 and ignores SIGTERM: `podman stop` waits the stop timeout, then SIGKILLs.
    let c = Httpd::new("web-1", Net::Host { port }).label(&format!("SERVICE_{port}_NAME"), "web").stop_timeout(6);
    podman.run_httpd(&c);
    let key = format!("upstreams/web/127.0.0.1:{port}");
    let id = format!("node-a:web-1:{port}");
    eventually("registration", || view.kv_json(&key).is_some_and(|v| v["down"] == 0) && !view.service_ids("web").is_empty());
    assert!(!view.in_maintenance(&id));

    let mut stopper = podman
        .command()
        .args(["stop", "web-1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("podman stop");
    // Marked down (KV down=1 and service maintenance) while the container still serves.
    eventually("KV marked down", || view.kv_json(&key).is_some_and(|v| v["down"] == 1));
    assert!(view.in_maintenance(&id), "service not in maintenance while draining");
    let (status, body) = http_get(&format!("http://127.0.0.1:{port}/")).expect("the container still answers during the drain");
    assert_eq!((status, body.trim()), (200, "web-1"));
    assert_ne!(podman.state("web-1").as_deref(), Some("exited"), "the container exited before the drain was seen");

    // Once it exits (stop timeout, then SIGKILL), everything is gone. The drain period (30s) is
    // bounded by the container's stop timeout (6s), so it does not linger.
    let _ = stopper.wait();
    eventually("KV entry removed", || view.kv_json(&key).is_none());
    eventually("service deregistered", || view.service_ids("web").is_empty());
    assert!(consul.kv_keys("upsync-sidecar/node-a/endpoints/").is_empty(), "ownership record left behind");
}

#[test]
fn a_killed_container_is_deregistered() {
    let dir = TestDir::new("sidecar_kill_9");
    let consul = Consul::start(dir.path());
    let podman = Podman::start(dir.path());
    let _sidecar = Sidecar::start(dir.path(), &consul.http_addr(), SidecarOpts::new("node-a", &podman.socket));
    let view = ConsulView(&consul);
    let c = Httpd::new("web-1", Net::Publish { host_port: free_port() }).label("SERVICE_NAME", "web");
    podman.run_httpd(&c);
    let key = format!("upstreams/web/{}", c.host_port());
    eventually("registration", || view.kv_json(&key).is_some() && view.service_ids("web").len() == 1);

    podman.podman(&["kill", "--signal", "KILL", "web-1"]);
    eventually("KV entry removed", || view.kv_json(&key).is_none());
    eventually("service deregistered", || view.service_ids("web").is_empty());
    eventually("ownership record removed", || consul.kv_keys("upsync-sidecar/node-a/endpoints/").is_empty());
    // Nothing else was touched, and the container is really gone from the engine's view.
    assert_eq!(podman.state("web-1").as_deref(), Some("exited"));
}

#[test]
fn a_container_port_is_registered_once_it_accepts_connections() {
    let dir = TestDir::new("sidecar_readiness");
    let consul = Consul::start(dir.path());
    let podman = Podman::start(dir.path());
    let _sidecar = Sidecar::start(dir.path(), &consul.http_addr(), SidecarOpts::new("node-a", &podman.socket));
    let view = ConsulView(&consul);
    let port = free_port();
    // The application needs 3 seconds before it listens.
    let c = Httpd::new("slow", Net::Host { port }).label(&format!("SERVICE_{port}_NAME"), "web").start_delay(3);
    podman.run_httpd(&c);
    let key = format!("upstreams/web/127.0.0.1:{port}");
    eventually("the container running", || podman.state("slow").as_deref() == Some("running"));
    assert!(view.kv_json(&key).is_none(), "registered before its port accepted connections");
    eventually("registration", || view.kv_json(&key).is_some());
    // Registered only once it answers: nginx is never sent to a port nothing listens on.
    let (status, body) = http_get(&format!("http://127.0.0.1:{port}/")).expect("the port accepts connections once registered");
    assert_eq!((status, body.trim()), (200, "slow"));
}
