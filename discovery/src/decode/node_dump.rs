//! Whole-catalog decoders, for consumers that serve every service at once (upsync-dns):
//! the node dump (`GET /v1/internal/ui/nodes`: every node with its services and checks), the
//! check lists of `GET /v1/health/state/<state>`, and `GET /v1/health/service/NAME` with the
//! health kept apart from `down` (for patching one service between two node dumps).
//!
//! Added by the DNS server's author as a child of `decode` so instances are built by the same
//! code ([`Instance::endpoint`]) as the catalog and health decoders: same address fallback,
//! same tag attributes, same weights.
use std::borrow::Cow;
use std::collections::HashMap;

use serde::Deserialize;

use super::{body_error, is_blank, DecodeError, Decoded, HealthEntry, HealthMode, HealthServiceDef, Instance, Skipped};
use crate::endpoint::{Endpoint, EndpointSet, Health};

#[derive(Deserialize)]
struct DumpNode<'a> {
    #[serde(rename = "Node", borrow, default)]
    node: Cow<'a, str>,
    #[serde(rename = "Address", borrow, default)]
    address: Cow<'a, str>,
    /// The node's services have the fields of a health entry's `Service`.
    #[serde(rename = "Services", borrow, default)]
    services: Option<Vec<HealthServiceDef<'a>>>,
    #[serde(rename = "Checks", borrow, default)]
    checks: Option<Vec<DumpCheck<'a>>>,
}

#[derive(Deserialize)]
struct DumpCheck<'a> {
    #[serde(rename = "Node", borrow, default)]
    node: Cow<'a, str>,
    #[serde(rename = "ServiceID", borrow, default)]
    service_id: Cow<'a, str>,
    #[serde(rename = "ServiceName", borrow, default)]
    service_name: Cow<'a, str>,
    #[serde(rename = "Status", borrow, default)]
    status: Cow<'a, str>,
}

/// The instance `s` on a node named `node` at `node_address` (its owned fields are taken).
fn instance<'a>(node: &'a str, node_address: &'a str, s: &'a mut HealthServiceDef<'_>) -> Instance<'a> {
    Instance {
        node,
        node_address,
        id: std::mem::take(&mut s.id),
        name: std::mem::take(&mut s.service),
        tags: s.tags.take().unwrap_or_default(),
        address: &s.address,
        meta: s.meta.take().unwrap_or_default(),
        port: s.port,
        weights: s.weights.take(),
    }
}

fn check_health(status: &str) -> Health {
    // An unknown status counts as critical, as in decode_health_service.
    Health::from_consul(status).unwrap_or(Health::Critical)
}

/// Decodes `GET /v1/internal/ui/nodes` (Consul's node dump): one endpoint per service
/// instance of every node, in the dump's order, with `node`, `service` and `service_id`
/// set. Health is the worst of the instance's checks and its node's checks (a failing
/// `serfHealth` makes every instance of the node critical), as `/v1/health/service` reports
/// it; `down` comes only from the tags. An instance without a usable address or port is
/// skipped with the reason.
pub fn decode_node_dump(body: &[u8]) -> Result<Decoded<Vec<Endpoint>>, DecodeError> {
    const WHAT: &str = "node dump";
    if is_blank(body) {
        return Ok(Decoded::default());
    }
    let nodes: Vec<DumpNode> = serde_json::from_slice(body).map_err(|e| body_error(WHAT, e))?;
    let mut endpoints = Vec::new();
    let mut skipped = Vec::new();
    for n in nodes {
        let mut node_health = Health::Passing;
        let mut by_service: HashMap<&str, Health> = HashMap::new();
        for c in n.checks.iter().flatten() {
            let h = check_health(&c.status);
            if c.service_id.is_empty() {
                node_health = node_health.max(h);
            } else {
                let e = by_service.entry(&c.service_id).or_insert(Health::Passing);
                *e = (*e).max(h);
            }
        }
        for mut s in n.services.into_iter().flatten() {
            let health = by_service.get(s.id.as_str()).copied().unwrap_or(Health::Passing).max(node_health);
            let inst = instance(&n.node, &n.address, &mut s);
            let key = inst.key();
            match inst.endpoint(health) {
                Ok(e) => endpoints.push(e),
                Err(reason) => skipped.push(Skipped { key, reason }),
            }
        }
    }
    Ok(Decoded { value: endpoints, skipped })
}

/// The instances of one service, taken from a node dump's endpoints ([`decode_node_dump`]),
/// as that service's own read gives them: with `mode` `None` as `/v1/catalog/service/NAME`
/// (health ignored), with `Some(mode)` as `/v1/health/service/NAME` decoded with
/// [`super::decode_health_service`] in that mode. `instances` are the dump's endpoints whose
/// `service` is the name (the caller groups them once for all the services it serves).
pub fn service_endpoints<'a>(instances: impl Iterator<Item = &'a Endpoint>, mode: Option<HealthMode>) -> Decoded<EndpointSet> {
    let mut out = Vec::new();
    for e in instances {
        let mut e = e.clone();
        match mode {
            None => e.health = Health::Passing,
            Some(HealthMode::Omit) if e.health != Health::Passing => continue,
            Some(_) => {
                if e.health != Health::Passing {
                    e.down = true;
                }
            }
        }
        out.push(e);
    }
    super::finish(out, Vec::new(), super::instance_key)
}

/// One check of a `GET /v1/health/state/<state>` list: whose it is and its status.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CheckState {
    pub node: String,
    /// Empty for a node-level check (it applies to every instance of the node).
    pub service_id: String,
    /// The instance's service name (empty for a node-level check).
    pub service_name: String,
    pub health: Health,
}

/// Decodes `GET /v1/health/state/<state>` (`critical`, `warning`, `any`...).
pub fn decode_check_states(body: &[u8]) -> Result<Vec<CheckState>, DecodeError> {
    const WHAT: &str = "health check list";
    if is_blank(body) {
        return Ok(Vec::new());
    }
    let checks: Vec<DumpCheck> = serde_json::from_slice(body).map_err(|e| body_error(WHAT, e))?;
    Ok(checks
        .into_iter()
        .map(|c| CheckState {
            node: c.node.into_owned(),
            service_id: c.service_id.into_owned(),
            service_name: c.service_name.into_owned(),
            health: check_health(&c.status),
        })
        .collect())
}

#[derive(Deserialize)]
struct UiService<'a> {
    #[serde(rename = "Name", borrow)]
    name: Cow<'a, str>,
    #[serde(rename = "InstanceCount", default)]
    instance_count: u64,
}

/// Decodes `GET /v1/internal/ui/services` (one entry per service with its instance count and
/// check totals, no addresses) into service name -> number of instances. A change of a count
/// names the service an instance joined or left, which `/v1/catalog/services` does not say.
pub fn decode_instance_counts(body: &[u8]) -> Result<HashMap<String, u64>, DecodeError> {
    const WHAT: &str = "service summary list";
    if is_blank(body) {
        return Ok(HashMap::new());
    }
    let list: Vec<UiService> = serde_json::from_slice(body).map_err(|e| body_error(WHAT, e))?;
    Ok(list.into_iter().map(|s| (s.name.into_owned(), s.instance_count)).collect())
}

#[derive(Deserialize)]
struct CatalogNode<'a> {
    #[serde(rename = "Node", borrow)]
    node: Cow<'a, str>,
    #[serde(rename = "Address", borrow, default)]
    address: Cow<'a, str>,
}

/// Decodes `GET /v1/catalog/nodes` into node name -> address. A change names the nodes whose
/// address changed or that left, and through them the services whose instances moved (an
/// instance without an address of its own is served at its node's).
pub fn decode_node_addresses(body: &[u8]) -> Result<HashMap<String, String>, DecodeError> {
    const WHAT: &str = "node list";
    if is_blank(body) {
        return Ok(HashMap::new());
    }
    let list: Vec<CatalogNode> = serde_json::from_slice(body).map_err(|e| body_error(WHAT, e))?;
    Ok(list.into_iter().map(|n| (n.node.into_owned(), n.address.into_owned())).collect())
}

/// Decodes `GET /v1/health/service/NAME` into one endpoint per instance, in Consul's order,
/// with `health` the worst of its checks and `down` from the tags only (unlike
/// [`super::decode_health_service`], which folds failing health into `down`).
pub fn decode_health_instances(body: &[u8]) -> Result<Decoded<Vec<Endpoint>>, DecodeError> {
    const WHAT: &str = "health service list";
    if is_blank(body) {
        return Ok(Decoded::default());
    }
    let entries: Vec<HealthEntry> = serde_json::from_slice(body).map_err(|e| body_error(WHAT, e))?;
    let mut d = Decoded { value: Vec::with_capacity(entries.len()), skipped: Vec::new() };
    for h in entries {
        let health = h.checks.iter().flatten().map(|c| check_health(&c.status)).max().unwrap_or(Health::Passing);
        let mut service = h.service;
        let inst = instance(&h.node.node, &h.node.address, &mut service);
        let key = inst.key();
        match inst.endpoint(health) {
            Ok(e) => d.value.push(e),
            Err(reason) => d.skipped.push(Skipped { key, reason }),
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::Host;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/testdata/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn instance_counts_from_the_ui_service_summary() {
        let counts = decode_instance_counts(&fixture("ui_services.json")).unwrap();
        // capture-dump.sh: 5 web, 2 api (one in maintenance: still an instance), the external
        // node's db, the sick node's cache, pg by host name, and Consul itself.
        let mut got: Vec<(&str, u64)> = counts.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        got.sort();
        assert_eq!(got, [("api", 2), ("cache", 1), ("consul", 1), ("db", 1), ("pg", 1), ("web", 5)]);
        assert!(decode_instance_counts(b"").unwrap().is_empty());
        let err = decode_instance_counts(b"{\"Name\":").unwrap_err().to_string();
        assert!(err.contains("service summary list"), "{err}");
    }

    #[test]
    fn node_addresses_from_the_catalog_node_list() {
        let nodes = decode_node_addresses(&fixture("dump_catalog_nodes.json")).unwrap();
        let mut got: Vec<(&str, &str)> = nodes.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        got.sort();
        assert_eq!(got, [("capture-node", "127.0.0.1"), ("ext-node", "10.1.2.3"), ("sick-node", "10.1.2.4")]);
        assert!(decode_node_addresses(b"").unwrap().is_empty());
        let err = decode_node_addresses(b"[{\"Address\": 1}]").unwrap_err().to_string();
        assert!(err.contains("node list"), "{err}");
    }

    fn by_id<'a>(eps: &'a [Endpoint], id: &str) -> &'a Endpoint {
        eps.iter().find(|e| e.service_id.as_deref() == Some(id)).unwrap_or_else(|| panic!("no instance {id}"))
    }

    #[test]
    fn node_dump_captured_from_consul() {
        let d = decode_node_dump(&fixture("dump_ui_nodes.json")).unwrap();
        assert!(d.skipped.is_empty(), "{:?}", d.skipped);
        let eps = &d.value;
        let web1 = by_id(eps, "web1");
        assert_eq!(
            (web1.host.clone(), web1.port, web1.weight, web1.health, web1.service.as_deref(), web1.node.as_deref()),
            (Host::Ip("127.0.0.5".parse().unwrap()), 8080, 3, Health::Passing, Some("web"), Some("capture-node"))
        );
        assert_eq!(web1.meta.get("team").map(String::as_str), Some("edge"));
        assert!(by_id(eps, "web2").backup);
        assert!(by_id(eps, "web3").down);
        assert_eq!(by_id(eps, "web4").health, Health::Critical);
        assert_eq!(by_id(eps, "web5").health, Health::Warning);
        // No service address: the node's.
        assert_eq!(by_id(eps, "api1").host, Host::Ip("127.0.0.1".parse().unwrap()));
        // Maintenance mode is a critical check.
        assert_eq!(by_id(eps, "api6").health, Health::Critical);
        assert_eq!(by_id(eps, "pg").host, Host::Name("db.example.com".into()));
        assert_eq!(by_id(eps, "db1").host, Host::Ip("10.1.2.3".parse().unwrap()));
        // A critical node check makes the node's instances critical.
        assert_eq!(by_id(eps, "cache1").health, Health::Critical);
        assert!(eps.iter().any(|e| e.service.as_deref() == Some("consul")));
    }

    #[test]
    fn check_states_captured_from_consul() {
        let c = decode_check_states(&fixture("dump_health_critical.json")).unwrap();
        let state = |node: &str, id: &str, name: &str, health| CheckState {
            node: node.into(),
            service_id: id.into(),
            service_name: name.into(),
            health,
        };
        assert!(c.contains(&state("capture-node", "web4", "web", Health::Critical)));
        assert!(c.contains(&state("sick-node", "", "", Health::Critical)));
        let w = decode_check_states(&fixture("dump_health_warning.json")).unwrap();
        assert_eq!(w, [state("capture-node", "web5", "web", Health::Warning)]);
    }

    #[test]
    fn health_instances_keep_health_apart_from_down() {
        let d = decode_health_instances(&fixture("dump_health_web.json")).unwrap();
        assert!(d.skipped.is_empty(), "{:?}", d.skipped);
        assert_eq!(d.value.len(), 5);
        let w5 = by_id(&d.value, "web5");
        assert_eq!((w5.health, w5.down), (Health::Warning, false));
        let w3 = by_id(&d.value, "web3");
        assert_eq!((w3.health, w3.down), (Health::Passing, true));
        assert_eq!(by_id(&d.value, "web4").health, Health::Critical);
        assert!(decode_health_instances(b"[{]").is_err());
    }

    #[test]
    fn bad_bodies_are_errors_bad_entries_are_skipped() {
        assert!(decode_node_dump(b"{").is_err());
        assert!(decode_node_dump(b"{\"a\":1}").is_err());
        assert!(decode_check_states(b"[1]").is_err());
        assert_eq!(decode_health_instances(b"").unwrap().value, []);
        assert_eq!(decode_node_dump(b"null").unwrap().value, []);
        let d = decode_node_dump(br#"[{"Node":"n","Address":"","Services":[{"ID":"x","Service":"s","Port":80}],"Checks":null}]"#).unwrap();
        assert_eq!(d.value, []);
        assert_eq!(d.skipped[0].key, "n/x");
        let d = decode_node_dump(br#"[{"Node":"n","Address":"10.0.0.1","Services":[{"ID":"x","Service":"s","Port":70000}]}]"#).unwrap();
        assert_eq!(d.skipped.len(), 1);
    }
}
