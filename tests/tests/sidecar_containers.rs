//! upsync-sidecar with real containers, on both engines: the Docker Engine (the machine's
//! dockerd) and podman's Docker-compatible API service; a real Consul dev agent. A container
//! that starts is registered (agent service with its check + upsync KV entry) with its labels'
//! metadata; SERVICE_IGNORE is honoured; a stopped container is drained (marked down while it
//! still runs) and then deregistered; a killed one is deregistered; Docker's own health check
//! status is the Consul check's.
use serde_json::json;
use upsync_tests::consul::Consul;
use upsync_tests::engine::{self, Kind};
use upsync_tests::net::{free_port, http_get};
use upsync_tests::podman::{Httpd, Net};
use upsync_tests::sidecar::{eventually, ConsulView, Sidecar};
use upsync_tests::TestDir;

upsync_tests::on_both_engines! {
    started_containers_are_registered_with_their_labels_and_ignored_ones_are_not => start_registers;
    a_stopped_container_is_drained_while_it_still_runs_then_deregistered => stop_drains;
    a_killed_container_is_deregistered => kill_deregisters;
    a_container_port_is_registered_once_it_accepts_connections => readiness;
}

fn test_dir(name: &str, kind: Kind) -> TestDir {
    TestDir::new(&engine::dir_name(name, kind))
}

fn start_registers(kind: Kind) {
    let dir = test_dir("sidecar_start_registers", kind);
    let consul = Consul::start(dir.path());
    let eng = engine::start(kind, dir.path(), false);
    let sidecar = Sidecar::start(dir.path(), &consul.http_addr(), eng.sidecar_opts("node-a"));
    let view = ConsulView(&consul);

    // Published port (podman: slirp4netns; Docker: the test's own bridge network), metadata from labels and env (labels win).
    let published = Httpd::new(&eng.unique("web-pub"), Net::Publish { host_port: free_port() })
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
    let host = Httpd::new(&eng.unique("web-host"), Net::Host { port }).label(&format!("SERVICE_{port}_NAME"), "web");
    let ignored = Httpd::new(&eng.unique("web-ignored"), Net::Host { port: free_port() })
        .label("SERVICE_NAME", "web")
        .label("SERVICE_IGNORE", "true");
    for c in [&published, &host, &ignored] {
        eng.run_httpd(c);
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
    assert_eq!(ids, vec![format!("node-a:{}:{port}", host.name), format!("node-a:{}:80", published.name)]);
    let services = view.services();
    let svc = &services[&format!("node-a:{}:80", published.name)];
    assert_eq!(svc["Address"], "127.0.0.1");
    assert_eq!(svc["Port"].as_u64().map(|p| p.to_string()), published.host_port().split(':').nth(1).map(str::to_string));
    let tags: Vec<&str> = svc["Tags"].as_array().unwrap().iter().filter_map(|t| t.as_str()).collect();
    for t in ["blue", "v2", "weight=3", "max_fails=4", "upsync-node=node-a"] {
        assert!(tags.contains(&t), "tag {t} missing: {tags:?}");
    }
    assert_eq!(svc["Meta"]["version"], "2.1");
    assert_eq!(svc["Meta"]["upsync-node"], "node-a");
    assert_eq!(svc["Meta"]["upsync-container"], published.name.as_str());
    assert_eq!(svc["Weights"]["Passing"], 3);

    // The HTTP check from SERVICE_CHECK_HTTP probes the container and passes.
    eventually("the HTTP check passing", || {
        view.checks().get(&format!("service:node-a:{}:80", published.name)).is_some_and(|c| c["Status"] == "passing")
    });

    // The ignored container is nowhere, and the API lists exactly the two others.
    assert!(!services.keys().any(|k| k.contains(&ignored.name)), "{services:?}");
    let listed = sidecar.api_json("GET", "/v1/endpoints/web", None, 200);
    let mut names: Vec<String> =
        listed.as_array().unwrap().iter().map(|e| e["source"]["name"].as_str().unwrap_or("").to_string()).collect();
    names.sort();
    assert_eq!(names, vec![host.name.clone(), published.name.clone()]);
    eventually("both endpoints synced", || {
        sidecar.api_json("GET", "/v1/endpoints/web", None, 200).as_array().unwrap().iter().all(|e| e["synced"] == true)
    });
}

fn stop_drains(kind: Kind) {
    let dir = test_dir("sidecar_stop_drains", kind);
    let consul = Consul::start(dir.path());
    let eng = engine::start(kind, dir.path(), false);
    let _sidecar = Sidecar::start(dir.path(), &consul.http_addr(), eng.sidecar_opts("node-a").arg("--drain").arg("30s"));
    let view = ConsulView(&consul);
    let port = free_port();
    // httpd is PID 1 and ignores SIGTERM: `stop` waits the stop timeout, then SIGKILLs.
    // (Docker announces the stop with a `kill` event naming SIGTERM; podman's stop is seen by
    // the sidecar's poll of the container list.)
    let name = eng.unique("web-1");
    let c = Httpd::new(&name, Net::Host { port }).label(&format!("SERVICE_{port}_NAME"), "web").stop_timeout(6);
    eng.run_httpd(&c);
    let key = format!("upstreams/web/127.0.0.1:{port}");
    let id = format!("node-a:{name}:{port}");
    eventually("registration", || view.kv_json(&key).is_some_and(|v| v["down"] == 0) && !view.service_ids("web").is_empty());
    assert!(!view.in_maintenance(&id));

    let mut stopper = eng.spawn_stop(&name);
    // Marked down (KV down=1 and service maintenance) while the container still serves.
    eventually("KV marked down", || view.kv_json(&key).is_some_and(|v| v["down"] == 1));
    assert!(view.in_maintenance(&id), "service not in maintenance while draining");
    let (status, body) = http_get(&format!("http://127.0.0.1:{port}/")).expect("the container still answers during the drain");
    assert_eq!((status, body.trim()), (200, name.as_str()));
    assert_ne!(eng.state(&name).as_deref(), Some("exited"), "the container exited before the drain was seen");

    // Once it exits (stop timeout, then SIGKILL), everything is gone. The drain period (30s) is
    // bounded by the container's stop timeout (6s), so it does not linger.
    let _ = stopper.wait();
    eventually("KV entry removed", || view.kv_json(&key).is_none());
    eventually("service deregistered", || view.service_ids("web").is_empty());
    assert!(consul.kv_keys("upsync-sidecar/node-a/endpoints/").is_empty(), "ownership record left behind");
}

fn kill_deregisters(kind: Kind) {
    let dir = test_dir("sidecar_kill_9", kind);
    let consul = Consul::start(dir.path());
    let eng = engine::start(kind, dir.path(), false);
    let _sidecar = Sidecar::start(dir.path(), &consul.http_addr(), eng.sidecar_opts("node-a"));
    let view = ConsulView(&consul);
    let name = eng.unique("web-1");
    let c = Httpd::new(&name, Net::Publish { host_port: free_port() }).label("SERVICE_NAME", "web");
    eng.run_httpd(&c);
    let key = format!("upstreams/web/{}", c.host_port());
    eventually("registration", || view.kv_json(&key).is_some() && view.service_ids("web").len() == 1);

    eng.cli(&["kill", "--signal", "KILL", &name]);
    eventually("KV entry removed", || view.kv_json(&key).is_none());
    eventually("service deregistered", || view.service_ids("web").is_empty());
    eventually("ownership record removed", || consul.kv_keys("upsync-sidecar/node-a/endpoints/").is_empty());
    // Nothing else was touched, and the container is really gone from the engine's view.
    assert_eq!(eng.state(&name).as_deref(), Some("exited"));
}

fn readiness(kind: Kind) {
    let dir = test_dir("sidecar_readiness", kind);
    let consul = Consul::start(dir.path());
    let eng = engine::start(kind, dir.path(), false);
    let _sidecar = Sidecar::start(dir.path(), &consul.http_addr(), eng.sidecar_opts("node-a"));
    let view = ConsulView(&consul);
    let port = free_port();
    let name = eng.unique("slow");
    // The application needs 3 seconds before it listens.
    let c = Httpd::new(&name, Net::Host { port }).label(&format!("SERVICE_{port}_NAME"), "web").start_delay(3);
    eng.run_httpd(&c);
    let key = format!("upstreams/web/127.0.0.1:{port}");
    eventually("the container running", || eng.state(&name).as_deref() == Some("running"));
    assert!(view.kv_json(&key).is_none(), "registered before its port accepted connections");
    eventually("registration", || view.kv_json(&key).is_some());
    // Registered only once it answers: nginx is never sent to a port nothing listens on.
    let (status, body) = http_get(&format!("http://127.0.0.1:{port}/")).expect("the port accepts connections once registered");
    assert_eq!((status, body.trim()), (200, name.as_str()));
}

/// Docker's own health check is the Consul check: a container whose `HEALTHCHECK` has not
/// passed yet, or fails, is registered down (KV `down=1`, service in maintenance: a critical
/// check); healthy again, it is up again. (Docker only: podman runs health checks from systemd
/// timers.)
#[test]
fn docker_health_status_is_the_consul_check() {
    let dir = TestDir::new("sidecar_docker_health");
    let consul = Consul::start(dir.path());
    let eng = engine::start(Kind::Docker, dir.path(), false);
    let _sidecar = Sidecar::start(dir.path(), &consul.http_addr(), eng.sidecar_opts("node-a"));
    let view = ConsulView(&consul);
    let port = free_port();
    let name = eng.unique("web-h");
    // Healthy while /tmp/ok exists (checked every second, unhealthy after one failure).
    let c = Httpd::new(&name, Net::Host { port }).label(&format!("SERVICE_{port}_NAME"), "web").health_cmd("test -f /tmp/ok");
    eng.run_httpd(&c);
    let key = format!("upstreams/web/127.0.0.1:{port}");
    let id = format!("node-a:{name}:{port}");
    // Whether the service has a critical check, `None` while Consul does not list it.
    let critical = || -> Option<bool> {
        let (status, body) = consul.api("GET", "/v1/health/service/web", None).expect("health API");
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("health JSON");
        let entry = v.as_array()?.iter().find(|e| e["Service"]["ID"] == id.as_str())?.clone();
        Some(entry["Checks"].as_array()?.iter().any(|c| c["Status"] == "critical"))
    };
    let docker_health = || eng.try_cli(&["inspect", "--format", "{{.State.Health.Status}}", &name]).unwrap_or_default();

    // Unhealthy from the first check on: registered, but down and critical.
    eventually("Docker reporting it unhealthy", || docker_health() == "unhealthy");
    eventually("registered down", || view.kv_json(&key).is_some_and(|v| v["down"] == 1));
    assert!(view.in_maintenance(&id), "an unhealthy container's service is not critical in Consul");
    assert_eq!(critical(), Some(true), "no critical check for the unhealthy container");

    // Healthy: up in KV, no critical check left.
    eng.cli(&["exec", &name, "touch", "/tmp/ok"]);
    eventually("Docker reporting it healthy", || docker_health() == "healthy");
    eventually("marked up", || view.kv_json(&key).is_some_and(|v| v["down"] == 0) && !view.in_maintenance(&id));
    eventually("no critical check", || critical() == Some(false));

    // Unhealthy again: down again.
    eng.cli(&["exec", &name, "rm", "/tmp/ok"]);
    eventually("marked down again", || view.kv_json(&key).is_some_and(|v| v["down"] == 1) && view.in_maintenance(&id));
    assert_eq!(critical(), Some(true));
}
