//! Agent API types: service registration with checks, and what the agent reports back.
use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::duration::format_go as go_duration;
use crate::error::Error;

/// A check status to set with [`crate::Client::check_update`]: `passing`, `warning`, `critical`.
pub type Status = crate::endpoint::Health;

/// Consul's service weights, used by its DNS interface for SRV answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceWeights {
    pub passing: u32,
    pub warning: u32,
}

/// What a check probes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckKind {
    /// The agent GETs (or `method`s) `url`; 2xx is passing, 429 warning, anything else critical.
    Http { url: String, method: Option<String>, headers: BTreeMap<String, Vec<String>>, tls_skip_verify: bool },
    /// The agent connects to `address` (`host:port`).
    Tcp { address: String },
    /// Someone (the sidecar) must report within `ttl` or the check turns critical.
    Ttl { ttl: Duration },
}

/// A check attached to a service registration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// Default (Consul's): `service:SERVICE_ID[:N]`.
    pub id: Option<String>,
    pub name: String,
    pub kind: CheckKind,
    /// How often HTTP/TCP checks run (required for them).
    pub interval: Option<Duration>,
    /// Per-probe timeout of HTTP/TCP checks.
    pub timeout: Option<Duration>,
    /// Consul removes the service when this check stays critical that long (minimum 1m).
    pub deregister_critical_service_after: Option<Duration>,
    /// Initial status (Consul's default: critical).
    pub status: Option<Status>,
    pub notes: Option<String>,
}

impl Check {
    fn to_json(&self) -> Result<Value, Error> {
        let bad = |m: &str| Error::Config(format!("check `{}`: {m}", self.name));
        let mut o = Map::new();
        if let Some(id) = &self.id {
            o.insert("CheckID".into(), json!(id));
        }
        o.insert("Name".into(), json!(self.name));
        match &self.kind {
            CheckKind::Http { url, method, headers, tls_skip_verify } => {
                if url.is_empty() {
                    return Err(bad("an HTTP check needs a URL"));
                }
                o.insert("HTTP".into(), json!(url));
                if let Some(m) = method {
                    o.insert("Method".into(), json!(m));
                }
                if !headers.is_empty() {
                    o.insert("Header".into(), json!(headers));
                }
                if *tls_skip_verify {
                    o.insert("TLSSkipVerify".into(), json!(true));
                }
            }
            CheckKind::Tcp { address } => {
                if address.is_empty() {
                    return Err(bad("a TCP check needs an address"));
                }
                o.insert("TCP".into(), json!(address));
            }
            CheckKind::Ttl { ttl } => {
                if ttl.is_zero() {
                    return Err(bad("a TTL check needs a TTL above zero"));
                }
                o.insert("TTL".into(), json!(go_duration(*ttl)));
            }
        }
        match (&self.kind, self.interval) {
            (CheckKind::Ttl { .. }, _) => {}
            (_, Some(i)) if !i.is_zero() => {
                o.insert("Interval".into(), json!(go_duration(i)));
            }
            _ => return Err(bad("HTTP and TCP checks need an interval above zero")),
        }
        if let Some(t) = self.timeout {
            o.insert("Timeout".into(), json!(go_duration(t)));
        }
        if let Some(d) = self.deregister_critical_service_after {
            o.insert("DeregisterCriticalServiceAfter".into(), json!(go_duration(d)));
        }
        if let Some(s) = self.status {
            o.insert("Status".into(), json!(s.as_str()));
        }
        if let Some(n) = &self.notes {
            o.insert("Notes".into(), json!(n));
        }
        Ok(Value::Object(o))
    }
}

/// `PUT /v1/agent/service/register`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceRegistration {
    /// Default (Consul's): the name.
    pub id: Option<String>,
    pub name: String,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    /// Default (Consul's): the node's address.
    pub address: Option<String>,
    pub port: Option<u16>,
    pub weights: Option<ServiceWeights>,
    pub checks: Vec<Check>,
    /// Sent as `?replace-existing-checks=true`: checks not in `checks` are removed.
    pub replace_existing_checks: bool,
}

impl ServiceRegistration {
    /// Consul's JSON for this registration. Refuses an empty name and incomplete checks.
    pub fn to_json(&self) -> Result<String, Error> {
        if self.name.is_empty() {
            return Err(Error::Config("service registration without a name".into()));
        }
        let mut o = Map::new();
        if let Some(id) = &self.id {
            o.insert("ID".into(), json!(id));
        }
        o.insert("Name".into(), json!(self.name));
        if !self.tags.is_empty() {
            o.insert("Tags".into(), json!(self.tags));
        }
        if !self.meta.is_empty() {
            o.insert("Meta".into(), json!(self.meta));
        }
        if let Some(a) = &self.address {
            o.insert("Address".into(), json!(a));
        }
        if let Some(p) = self.port {
            o.insert("Port".into(), json!(p));
        }
        if let Some(w) = self.weights {
            o.insert("Weights".into(), json!({ "Passing": w.passing, "Warning": w.warning }));
        }
        if !self.checks.is_empty() {
            let checks = self.checks.iter().map(Check::to_json).collect::<Result<Vec<_>, _>>()?;
            o.insert("Checks".into(), Value::Array(checks));
        }
        Ok(Value::Object(o).to_string())
    }
}

/// A service as `/v1/agent/services` reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct AgentService {
    #[serde(rename = "ID", default)]
    pub id: String,
    #[serde(rename = "Service", default)]
    pub service: String,
    #[serde(rename = "Tags", default, deserialize_with = "null_default")]
    pub tags: Vec<String>,
    #[serde(rename = "Meta", default, deserialize_with = "null_default")]
    pub meta: BTreeMap<String, String>,
    #[serde(rename = "Address", default)]
    pub address: String,
    #[serde(rename = "Port", default)]
    pub port: u16,
}

/// A check as `/v1/agent/checks` reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct AgentCheck {
    #[serde(rename = "CheckID", default)]
    pub id: String,
    #[serde(rename = "Name", default)]
    pub name: String,
    #[serde(rename = "Status", default)]
    pub status: String,
    #[serde(rename = "Output", default)]
    pub output: String,
    #[serde(rename = "ServiceID", default)]
    pub service_id: String,
    #[serde(rename = "ServiceName", default)]
    pub service_name: String,
}

fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_json_has_consul_field_names() {
        let reg = ServiceRegistration {
            id: Some("web-1".into()),
            name: "web".into(),
            tags: vec!["weight=5".into()],
            address: Some("10.0.0.1".into()),
            port: Some(8080),
            weights: Some(ServiceWeights { passing: 5, warning: 1 }),
            checks: vec![
                Check {
                    id: None,
                    name: "http".into(),
                    kind: CheckKind::Http {
                        url: "http://10.0.0.1:8080/health".into(),
                        method: None,
                        headers: BTreeMap::new(),
                        tls_skip_verify: false,
                    },
                    interval: Some(Duration::from_secs(10)),
                    timeout: Some(Duration::from_millis(1500)),
                    deregister_critical_service_after: Some(Duration::from_secs(90 * 60)),
                    status: None,
                    notes: None,
                },
                Check {
                    id: Some("ttl".into()),
                    name: "ttl".into(),
                    kind: CheckKind::Ttl { ttl: Duration::from_secs(15) },
                    interval: None,
                    timeout: None,
                    deregister_critical_service_after: None,
                    status: Some(Status::Passing),
                    notes: None,
                },
            ],
            ..Default::default()
        };
        let v: Value = serde_json::from_str(&reg.to_json().unwrap()).unwrap();
        assert_eq!(v["Checks"][0]["HTTP"], "http://10.0.0.1:8080/health");
        assert_eq!(v["Checks"][0]["Interval"], "10s");
        assert_eq!(v["Checks"][0]["Timeout"], "1500ms");
        assert_eq!(v["Checks"][0]["DeregisterCriticalServiceAfter"], "5400s");
        assert_eq!(v["Checks"][1]["TTL"], "15s");
        assert_eq!(v["Checks"][1]["Status"], "passing");
        assert_eq!(v["Weights"]["Passing"], 5);
        let mut bad = reg.clone();
        bad.checks[0].interval = None;
        assert!(bad.to_json().unwrap_err().to_string().contains("interval"));
    }
}
