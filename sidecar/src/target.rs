//! What Consul should hold for one endpoint: the agent service (with its checks and its
//! maintenance state), the upsync KV entry, and this node's ownership record. Pure functions:
//! the applier compares a [`Target`] with what it knows Consul holds ([`Written`]) and sends
//! only the difference.
use std::collections::BTreeMap;
use std::hash::Hasher;

use serde::{Deserialize, Serialize};
use upsync_discovery::upsync::KvValue;
use upsync_discovery::{Check, CheckKind as ConsulCheckKind, ServiceRegistration, ServiceWeights};

use crate::config::Settings;
use crate::model::{CheckKind, EndpointSpec, Source, META_CONTAINER, META_HASH, META_NODE, META_SOURCE};

/// Why an endpoint is marked down, if it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DownReason {
    /// Its owner registered it down.
    Registered,
    /// It is being drained before removal.
    Draining,
    /// Its container is paused.
    Paused,
    /// Its container's own health check (Docker's `HEALTHCHECK`) has not passed yet.
    HealthStarting,
    /// Its container's own health check fails.
    Unhealthy,
}

impl DownReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            DownReason::Registered => "registered down",
            DownReason::Draining => "draining before removal",
            DownReason::Paused => "container paused",
            DownReason::HealthStarting => "container health check starting",
            DownReason::Unhealthy => "container unhealthy",
        }
    }
}

/// The ownership record kept in Consul KV at `STATE_PREFIX/NODE/endpoints/ID`: the whole
/// endpoint, so that API endpoints survive a restart of the sidecar and everything this node
/// registered can be found (and removed) after a crash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub spec: EndpointSpec,
    #[serde(default)]
    pub draining: bool,
    /// The upsync KV entry written with this record (the prefix may change between runs).
    #[serde(default)]
    pub kv_key: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceTarget {
    pub registration: ServiceRegistration,
    /// Fingerprint of the registration, also stored in its meta (`upsync-hash`).
    pub hash: String,
    /// Service maintenance on (the endpoint is down): Consul adds a critical check.
    pub maintenance: Option<String>,
}

/// What Consul should hold for an endpoint id; all `None` when it should hold nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Target {
    pub service: Option<ServiceTarget>,
    /// (key, value) of the upsync KV entry.
    pub kv: Option<(String, String)>,
    /// (key, value) of the ownership record.
    pub record: Option<(String, String)>,
}

/// The ownership record's key for an endpoint id.
pub fn record_key(s: &Settings, id: &str) -> String {
    format!("{}{id}", s.records_prefix())
}

/// The agent service of `spec`, tagged and annotated with this node's id.
pub fn registration(spec: &EndpointSpec, s: &Settings) -> (ServiceRegistration, String) {
    let mut tags: Vec<String> = Vec::new();
    let mut add = |t: String| {
        if !tags.contains(&t) {
            tags.push(t);
        }
    };
    spec.tags.iter().cloned().for_each(&mut add);
    s.tags.iter().cloned().for_each(&mut add);
    // The module's consul_services mode reads these attributes from tags.
    if spec.weight != s.defaults.weight {
        add(format!("weight={}", spec.weight));
    }
    if spec.max_fails != s.defaults.max_fails {
        add(format!("max_fails={}", spec.max_fails));
    }
    if spec.fail_timeout != s.defaults.fail_timeout {
        add(format!("fail_timeout={}s", spec.fail_timeout));
    }
    if spec.backup {
        add("backup".into());
    }
    add(format!("upsync-node={}", s.node_id));

    let mut meta: BTreeMap<String, String> = spec.meta.clone();
    meta.insert(META_NODE.into(), s.node_id.clone());
    match &spec.source {
        Source::Api => {
            meta.insert(META_SOURCE.into(), "api".into());
        }
        Source::Container { name, .. } => {
            meta.insert(META_SOURCE.into(), "container".into());
            meta.insert(META_CONTAINER.into(), name.clone());
        }
    }
    let addr = spec.addr();
    let checks = spec
        .check
        .iter()
        .map(|c| {
            let (kind, name) = match &c.kind {
                CheckKind::Http(p) if p.starts_with("http://") || p.starts_with("https://") => (
                    ConsulCheckKind::Http { url: p.clone(), method: None, headers: BTreeMap::new(), tls_skip_verify: false },
                    format!("HTTP GET {p}"),
                ),
                CheckKind::Http(p) => (
                    ConsulCheckKind::Http {
                        url: format!("http://{addr}{p}"),
                        method: None,
                        headers: BTreeMap::new(),
                        tls_skip_verify: false,
                    },
                    format!("HTTP GET {p}"),
                ),
                CheckKind::Tcp => (ConsulCheckKind::Tcp { address: addr.clone() }, format!("TCP connect {addr}")),
                CheckKind::Ttl(ttl) => (ConsulCheckKind::Ttl { ttl: *ttl }, "TTL".to_string()),
            };
            let is_ttl = matches!(kind, ConsulCheckKind::Ttl { .. });
            Check {
                id: None,
                name: format!("{}: {name}", spec.service),
                kind,
                interval: (!is_ttl).then_some(c.interval),
                timeout: (!is_ttl).then_some(c.timeout),
                deregister_critical_service_after: c.deregister_after,
                status: None,
                notes: Some(format!("registered by upsync-sidecar on {}", s.node_id)),
            }
        })
        .collect();
    let mut reg = ServiceRegistration {
        id: Some(spec.id.clone()),
        name: spec.service.clone(),
        tags,
        meta,
        address: Some(spec.address.to_string()),
        port: Some(spec.port),
        weights: Some(ServiceWeights { passing: spec.weight, warning: 1 }),
        checks,
        replace_existing_checks: true,
    };
    let hash = fingerprint(&reg);
    reg.meta.insert(META_HASH.into(), hash.clone());
    (reg, hash)
}

/// FNV-1a of the registration's JSON: stable across runs and versions (unlike std's
/// `DefaultHasher`), so a restarted sidecar recognises its own unchanged registrations.
fn fingerprint(reg: &ServiceRegistration) -> String {
    let json = reg.to_json().unwrap_or_default();
    let mut h = fnv::FnvHasher::default();
    h.write(json.as_bytes());
    format!("{:016x}", h.finish())
}

/// The target of an endpoint that should exist, marked down for `down` if given.
pub fn target(spec: &EndpointSpec, down: Option<DownReason>, s: &Settings) -> Target {
    let draining = down == Some(DownReason::Draining);
    let is_down = spec.down || down.is_some();
    let service = s.services_enabled.then(|| {
        let (registration, hash) = registration(spec, s);
        let maintenance = down
            .as_ref()
            .or(spec.down.then_some(&DownReason::Registered))
            .map(|r| format!("upsync-sidecar on {}: {}", s.node_id, r.as_str()));
        ServiceTarget { registration, hash, maintenance }
    });
    let kv = if s.kv_enabled {
        spec.kv_key(&s.kv_prefix).map(|k| {
            let v = KvValue {
                weight: spec.weight,
                max_fails: spec.max_fails,
                fail_timeout: spec.fail_timeout,
                down: is_down,
                backup: spec.backup,
            };
            (k, v.to_json())
        })
    } else {
        None
    };
    let record = Record { spec: spec.clone(), draining, kv_key: kv.as_ref().map(|(k, _)| k.clone()) };
    let record_json = serde_json::to_string(&record).unwrap_or_default();
    Target { service, kv, record: Some((record_key(s, &spec.id), record_json)) }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::{Args, FileConfig};
    use crate::model::{parse_host, CheckSpec, Protocol};
    use clap::Parser;
    use std::time::Duration;

    pub fn settings(extra: &[&str]) -> Settings {
        let mut args = vec!["upsync-sidecar", "--advertise-ip", "192.0.2.10", "--node-id", "node-a"];
        args.extend_from_slice(extra);
        Settings::merge(Args::try_parse_from(args).unwrap(), FileConfig::default(), None).unwrap()
    }

    pub fn spec(id: &str, addr: &str, port: u16) -> EndpointSpec {
        EndpointSpec {
            service: "web".into(),
            id: id.into(),
            address: parse_host(addr).unwrap(),
            port,
            protocol: Protocol::Tcp,
            weight: 1,
            max_fails: 2,
            fail_timeout: 10,
            backup: false,
            down: false,
            tags: vec!["v2".into()],
            meta: BTreeMap::from([("version".to_string(), "2".to_string())]),
            check: Some(CheckSpec {
                kind: CheckKind::Http("/health".into()),
                interval: Duration::from_secs(2),
                timeout: Duration::from_secs(1),
                deregister_after: None,
            }),
            source: Source::Api,
        }
    }

    #[test]
    fn service_carries_node_tag_meta_attributes_and_check() {
        let s = settings(&["--tags", "dc-east"]);
        let mut sp = spec("web-1", "10.0.0.5", 8080);
        sp.weight = 5;
        sp.backup = true;
        let (reg, hash) = registration(&sp, &s);
        assert_eq!(reg.tags, vec!["v2", "dc-east", "weight=5", "backup", "upsync-node=node-a"]);
        assert_eq!(reg.meta.get(META_NODE).map(String::as_str), Some("node-a"));
        assert_eq!(reg.meta.get(META_SOURCE).map(String::as_str), Some("api"));
        assert_eq!(reg.meta.get(META_HASH), Some(&hash));
        assert_eq!(reg.meta.get("version").map(String::as_str), Some("2"));
        assert_eq!(reg.weights, Some(ServiceWeights { passing: 5, warning: 1 }));
        let json: serde_json::Value = serde_json::from_str(&reg.to_json().unwrap()).unwrap();
        assert_eq!(json["Checks"][0]["HTTP"], "http://10.0.0.5:8080/health");
        assert_eq!(json["Checks"][0]["Interval"], "2s");
        // Same input, same fingerprint; any change, another one.
        assert_eq!(registration(&sp, &s).1, hash);
        sp.port = 8081;
        assert_ne!(registration(&sp, &s).1, hash);
    }

    #[test]
    fn kv_value_is_what_the_module_reads_and_down_marks_it() {
        let s = settings(&["--kv-prefix", "upstreams"]);
        let sp = spec("web-1", "10.0.0.5", 8080);
        let t = target(&sp, None, &s);
        assert_eq!(
            t.kv,
            Some((
                "upstreams/web/10.0.0.5:8080".to_string(),
                r#"{"weight":1,"max_fails":2,"fail_timeout":10,"down":0,"backup":0}"#.to_string()
            ))
        );
        assert_eq!(t.service.as_ref().unwrap().maintenance, None);
        let d = target(&sp, Some(DownReason::Draining), &s);
        assert!(d.kv.as_ref().unwrap().1.contains(r#""down":1"#));
        assert!(d.service.as_ref().unwrap().maintenance.as_ref().unwrap().contains("draining"));
        let rec: Record = serde_json::from_str(&d.record.as_ref().unwrap().1).unwrap();
        assert!(rec.draining);
        assert_eq!(d.record.as_ref().unwrap().0, "upsync-sidecar/node-a/endpoints/web-1");
        // The registration itself does not change while draining: no re-registration.
        assert_eq!(d.service.unwrap().hash, t.service.unwrap().hash);
    }

    #[test]
    fn outputs_can_be_turned_off() {
        let sp = spec("web-1", "10.0.0.5", 8080);
        let t = target(&sp, None, &settings(&["--no-kv"]));
        assert!(t.kv.is_none() && t.service.is_some() && t.record.is_some());
        let t = target(&sp, None, &settings(&["--no-services"]));
        assert!(t.kv.is_some() && t.service.is_none() && t.record.is_some());
    }
}
