//! The sidecar after faults, on both engines (the Docker Engine and podman's API service) with
//! a real Consul: a Consul outage (changes are queued and applied in order when it returns; a
//! dev agent comes back empty and gets everything again), a sidecar crash (containers changed
//! meanwhile are reconciled without rewriting what did not change), and a restart of the
//! engine's API service (the event stream breaks; the sidecar reconnects and catches up,
//! without exiting). The machine's dockerd is not restarted: the Docker variant cuts the API
//! with a forwarder in front of its socket (`upsync_tests::docker`), which breaks the same
//! connections a restart would.
use serde_json::Value;
use upsync_tests::consul::Consul;
use upsync_tests::engine::{self, Engine, Kind};
use upsync_tests::net::{free_port, http_get};
use upsync_tests::podman::{Httpd, Net};
use upsync_tests::sidecar::{eventually, ConsulView, Sidecar};
use upsync_tests::TestDir;

upsync_tests::on_both_engines! {
    consul_outage_queues_changes_and_a_restarted_agent_gets_everything_back => consul_outage;
    a_restarted_sidecar_reconciles_what_changed_while_it_was_down => crash_reconcile;
    the_sidecar_reconnects_when_the_engine_api_restarts_and_catches_up => engine_restart;
}

fn web(eng: &dyn Engine, name: &str) -> (Httpd, String) {
    let port = free_port();
    let c = Httpd::new(&eng.unique(name), Net::Host { port }).label(&format!("SERVICE_{port}_NAME"), "web");
    (c, format!("upstreams/web/127.0.0.1:{port}"))
}

fn modify_index(consul: &Consul, key: &str) -> u64 {
    let (status, body) = consul.api("GET", &format!("/v1/kv/{key}"), None).expect("KV get");
    assert_eq!(status, 200, "{key}: {body}");
    let v: Value = serde_json::from_str(&body).expect("KV JSON");
    v[0]["ModifyIndex"].as_u64().expect("ModifyIndex")
}

fn consul_outage(kind: Kind) {
    let dir = TestDir::new(&engine::dir_name("sidecar_consul_outage", kind));
    let mut consul = Consul::start(dir.path());
    let eng = engine::start(kind, dir.path(), false);
    let sidecar = Sidecar::start(dir.path(), &consul.http_addr(), eng.sidecar_opts("node-a"));
    let (c1, k1) = web(&*eng, "c1");
    let (c2, k2) = web(&*eng, "c2");
    eng.run_httpd(&c1);
    sidecar.api_json("PUT", "/v1/endpoints/api/a1", Some(r#"{"address":"10.0.0.1","port":80}"#), 201);
    {
        let view = ConsulView(&consul);
        eventually("c1 and a1 registered", || {
            view.kv_json(&k1).is_some() && view.kv_json("upstreams/api/10.0.0.1:80").is_some() && view.service_ids("web").len() == 1
        });
    }

    // Consul goes away (a dev agent loses everything).
    consul.stop();
    sidecar.api_json("PUT", "/v1/endpoints/api/a2", Some(r#"{"address":"10.0.0.2","port":80}"#), 201);
    sidecar.api_json("PUT", "/v1/endpoints/api/a3", Some(r#"{"address":"10.0.0.3","port":80}"#), 201);
    sidecar.api_json("DELETE", "/v1/endpoints/api/a2", None, 200);
    eng.run_httpd(&c2);
    eng.remove(&c1.name);
    eventually("the sidecar to notice", || {
        let h = sidecar.healthz();
        h["consul"]["reachable"] == false && h["status"] == "degraded"
    });
    eventually("c1 gone and c2 known to the sidecar", || {
        let list = sidecar.api_json("GET", "/v1/endpoints/web", None, 200);
        list.as_array().is_some_and(|l| l.len() == 1 && l[0]["source"]["name"] == c2.name.as_str() && l[0]["synced"] == false)
    });
    assert!(sidecar.healthz()["consul"]["pending_changes"].as_u64().unwrap_or(0) > 0);

    consul.restart();
    let view = ConsulView(&consul);
    eventually("everything registered again", || {
        view.kv_json(&k2).is_some()
            && view.kv_json("upstreams/api/10.0.0.1:80").is_some()
            && view.kv_json("upstreams/api/10.0.0.3:80").is_some()
            && view.service_ids("web").len() == 1
            && view.service_ids("api").len() == 2
    });
    let mut keys = consul.kv_keys("upstreams/");
    keys.sort();
    let mut expected = vec![k2.clone(), "upstreams/api/10.0.0.1:80".to_string(), "upstreams/api/10.0.0.3:80".to_string()];
    expected.sort();
    assert_eq!(keys, expected, "a deleted endpoint (a2) or a removed container (c1) reached Consul");
    assert_eq!(view.service_ids("api"), vec!["a1".to_string(), "a3".to_string()]);
    eventually("healthy again", || sidecar.healthz()["status"] == "ok");
    assert!(sidecar.log().contains("queued"), "the outage was not reported in the log");
}

fn crash_reconcile(kind: Kind) {
    let dir = TestDir::new(&engine::dir_name("sidecar_crash_reconcile", kind));
    let consul = Consul::start(dir.path());
    let eng = engine::start(kind, dir.path(), false);
    let view = ConsulView(&consul);
    let mut sidecar = Sidecar::start(dir.path(), &consul.http_addr(), eng.sidecar_opts("node-a"));
    let (c1, k1) = web(&*eng, "c1");
    let (c2, k2) = web(&*eng, "c2");
    let (c3, k3) = web(&*eng, "c3");
    eng.run_httpd(&c1);
    eng.run_httpd(&c2);
    eventually("c1 and c2 registered", || view.kv_json(&k1).is_some() && view.kv_json(&k2).is_some() && view.service_ids("web").len() == 2);
    let c2_index = modify_index(&consul, &k2);

    sidecar.kill();
    eng.remove(&c1.name);
    eng.run_httpd(&c3);
    eventually("c3 answering", || http_get(&format!("http://{}/", c3.host_port())).is_ok_and(|(s, _)| s == 200));
    // Nothing changes in Consul while the sidecar is down (registrator's complaint: a killed
    // registrator leaves services behind; here the next start cleans them up).
    assert!(view.kv_json(&k1).is_some());

    sidecar.restart();
    eventually("c1 deregistered and c3 registered", || {
        view.kv_json(&k1).is_none() && view.kv_json(&k3).is_some() && view.service_ids("web").len() == 2
    });
    let ids = view.service_ids("web");
    assert!(ids.iter().all(|id| !id.contains(&format!(":{}:", c1.name))), "{ids:?}");
    assert_eq!(modify_index(&consul, &k2), c2_index, "the unchanged container's entry was rewritten (flapped)");
    assert!(!sidecar.log().contains(&format!("deregistered id=\"node-a:{}", c2.name)), "c2 was deregistered during the restart");
}

fn engine_restart(kind: Kind) {
    let dir = TestDir::new(&engine::dir_name("sidecar_engine_restart", kind));
    let consul = Consul::start(dir.path());
    let mut eng = engine::start(kind, dir.path(), true);
    let view = ConsulView(&consul);
    let sidecar = Sidecar::start(dir.path(), &consul.http_addr(), eng.sidecar_opts("node-a"));
    let (c1, k1) = web(&*eng, "c1");
    let (c2, k2) = web(&*eng, "c2");
    let (c3, k3) = web(&*eng, "c3");
    eng.run_httpd(&c1);
    eng.run_httpd(&c2);
    eventually("c1 and c2 registered", || view.kv_json(&k1).is_some() && view.kv_json(&k2).is_some());

    eng.stop_service();
    eventually("the sidecar to see the engine gone", || sidecar.healthz()["engine"]["connected"] == false);
    // Containers keep running without the API service; changes meanwhile are caught up later.
    eng.remove(&c1.name);
    eng.run_httpd(&c3);
    assert!(view.kv_json(&k1).is_some(), "registrations must be kept while the engine is unreachable");

    eng.start_service();
    eventually("reconnected", || sidecar.healthz()["engine"]["connected"] == true);
    eventually("caught up", || view.kv_json(&k1).is_none() && view.kv_json(&k3).is_some());
    assert!(view.kv_json(&k2).is_some());
    eventually("healthy", || sidecar.healthz()["status"] == "ok");

    // The new stream delivers events again.
    eng.cli(&["kill", "--signal", "KILL", &c2.name]);
    eventually("c2 deregistered", || view.kv_json(&k2).is_none());
}
