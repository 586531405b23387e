//! Whole-catalog decoders, for consumers that serve every service at once (upsync-dns):
//! the node dump (`GET /v1/internal/ui/nodes`: every node with its services and checks) and
//! the check lists of `GET /v1/health/state/<state>`.
//!
//! Added by the DNS server's author as a child of `decode` so instances are built by the same
//! code ([`Instance::endpoint`]) as the catalog and health decoders: same address fallback,
//! same tag attributes, same weights.
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

use super::{body_error, is_blank, Decoded, DecodeError, Instance, Skipped, Weights};
use crate::endpoint::{Endpoint, Health};

#[derive(Deserialize)]
struct DumpNode<'a> {
    #[serde(rename = "Node", borrow, default)]
    node: Cow<'a, str>,
    #[serde(rename = "Address", borrow, default)]
    address: Cow<'a, str>,
    #[serde(rename = "Services", default)]
    services: Option<Vec<DumpService<'a>>>,
    #[serde(rename = "Checks", borrow, default)]
    checks: Option<Vec<DumpCheck<'a>>>,
}

#[derive(Deserialize)]
struct DumpService<'a> {
    #[serde(rename = "ID", default)]
    id: String,
    #[serde(rename = "Service", default)]
    service: String,
    #[serde(rename = "Tags", default)]
    tags: Option<Vec<String>>,
    #[serde(rename = "Address", borrow, default)]
    address: Cow<'a, str>,
    #[serde(rename = "Meta", default)]
    meta: Option<BTreeMap<String, String>>,
    #[serde(rename = "Port", default)]
    port: i64,
    #[serde(rename = "Weights", default)]
    weights: Option<Weights>,
}

#[derive(Deserialize)]
struct DumpCheck<'a> {
    #[serde(rename = "Node", borrow, default)]
    node: Cow<'a, str>,
    #[serde(rename = "ServiceID", borrow, default)]
    service_id: Cow<'a, str>,
    #[serde(rename = "Status", borrow, default)]
    status: Cow<'a, str>,
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
        for s in n.services.into_iter().flatten() {
            let health = by_service.get(s.id.as_str()).copied().unwrap_or(Health::Passing).max(node_health);
            let inst = Instance {
                node: &n.node,
                node_address: &n.address,
                id: s.id,
                name: s.service,
                tags: s.tags.unwrap_or_default(),
                address: &s.address,
                meta: s.meta.unwrap_or_default(),
                port: s.port,
                weights: s.weights,
            };
            let key = inst.key();
            match inst.endpoint(health) {
                Ok(e) => endpoints.push(e),
                Err(reason) => skipped.push(Skipped { key, reason }),
            }
        }
    }
    Ok(Decoded { value: endpoints, skipped })
}

/// One check of a `GET /v1/health/state/<state>` list: whose it is and its status.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CheckState {
    pub node: String,
    /// Empty for a node-level check (it applies to every instance of the node).
    pub service_id: String,
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
        .map(|c| CheckState { node: c.node.into_owned(), service_id: c.service_id.into_owned(), health: check_health(&c.status) })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::Host;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/testdata/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
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
        assert!(c.contains(&CheckState { node: "capture-node".into(), service_id: "web4".into(), health: Health::Critical }));
        assert!(c.contains(&CheckState { node: "sick-node".into(), service_id: String::new(), health: Health::Critical }));
        let w = decode_check_states(&fixture("dump_health_warning.json")).unwrap();
        assert_eq!(w, [CheckState { node: "capture-node".into(), service_id: "web5".into(), health: Health::Warning }]);
    }

    #[test]
    fn bad_bodies_are_errors_bad_entries_are_skipped() {
        assert!(decode_node_dump(b"{").is_err());
        assert!(decode_node_dump(b"{\"a\":1}").is_err());
        assert!(decode_check_states(b"[1]").is_err());
        assert_eq!(decode_node_dump(b"null").unwrap().value, []);
        let d = decode_node_dump(br#"[{"Node":"n","Address":"","Services":[{"ID":"x","Service":"s","Port":80}],"Checks":null}]"#).unwrap();
        assert_eq!(d.value, []);
        assert_eq!(d.skipped[0].key, "n/x");
        let d = decode_node_dump(br#"[{"Node":"n","Address":"10.0.0.1","Services":[{"ID":"x","Service":"s","Port":70000}]}]"#).unwrap();
        assert_eq!(d.skipped.len(), 1);
    }
}
