//! The facts about a container the sidecar needs, taken from the Engine API's inspect answer
//! (Docker's or podman's; both shapes are covered by the tests with captured answers).
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use bollard::models::{ContainerInspectResponse, ContainerStateStatusEnum, HealthStatusEnum};

use crate::model::Protocol;

/// Docker's and podman's stop timeout when a container sets none.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    /// A stop is in progress (podman reports this state; Docker sends a `kill` event instead).
    Stopping,
    Restarting,
    /// Created, exited, dead, removing: nothing to register.
    NotRunning,
}

/// The container's own health check (Docker's `HEALTHCHECK`, podman's `--health-cmd`), as the
/// engine reports it in `State.Health.Status`. A container without one has none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealthState {
    /// Not yet passed (Docker's start period): not sent traffic yet.
    Starting,
    Healthy,
    Unhealthy,
}

/// A published port: container `port/proto` reachable at `host_ip:host_port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    pub port: u16,
    pub protocol: Protocol,
    /// `None` when published on every host address (0.0.0.0, ::, or empty).
    pub host_ip: Option<IpAddr>,
    pub host_port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: String,
    /// Without Docker's leading `/`.
    pub name: String,
    /// The image as the container was created from it (`Config.Image`).
    pub image: String,
    pub state: RunState,
    pub labels: BTreeMap<String, String>,
    /// `KEY=VALUE` pairs of the environment, in order.
    pub env: Vec<(String, String)>,
    pub network_mode: String,
    pub published: Vec<Published>,
    pub exposed: Vec<(u16, Protocol)>,
    /// Addresses on the container's networks, by network name.
    pub ips: Vec<(String, IpAddr)>,
    pub stop_timeout: Duration,
    pub stop_signal: Option<String>,
    /// The engine's health check status, if the container has a health check.
    pub health: Option<HealthState>,
}

/// Parses an inspect answer bollard refused: podman reports states Docker does not have
/// (`stopped`, `configured`, `initialized`...), which bollard's strict enum rejects. They are
/// mapped to Docker's nearest state and the answer is parsed again.
pub fn parse_lenient_inspect(json: &str) -> Result<ContainerInspectResponse, String> {
    let mut v: serde_json::Value = serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
    if let Some(status) = v.pointer_mut("/State/Status") {
        let known = ["", "created", "running", "paused", "restarting", "removing", "exited", "dead", "stopping"];
        let mapped = match status.as_str().unwrap_or("") {
            s if known.contains(&s) => s.to_string(),
            "configured" | "initialized" => "created".to_string(),
            _ => "exited".to_string(), // stopped, unknown...
        };
        *status = serde_json::Value::String(mapped);
    }
    // A health status bollard does not know (podman writes "" or its own words): no health.
    if let Some(state) = v.pointer_mut("/State").and_then(|s| s.as_object_mut()) {
        let known = ["", "none", "starting", "healthy", "unhealthy"];
        if state.get("Health").and_then(|h| h.get("Status")).and_then(|s| s.as_str()).is_some_and(|s| !known.contains(&s)) {
            state.remove("Health");
        }
    }
    serde_json::from_value(v).map_err(|e| e.to_string())
}

/// Parses `80/tcp`, `53/udp`, `8080` (tcp).
pub fn parse_port_proto(s: &str) -> Option<(u16, Protocol)> {
    let (port, proto) = match s.split_once('/') {
        Some((p, proto)) => (p, proto),
        None => (s, "tcp"),
    };
    let proto = match proto.to_ascii_lowercase().as_str() {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        _ => return None, // sctp: nothing nginx or Consul DNS clients use
    };
    let port: u16 = port.parse().ok()?;
    (port != 0).then_some((port, proto))
}

impl ContainerInfo {
    /// The container from an inspect answer. Errors name the missing field.
    pub fn from_inspect(r: &ContainerInspectResponse) -> Result<ContainerInfo, String> {
        let id = r.id.clone().filter(|s| !s.is_empty()).ok_or("inspect answer without Id")?;
        let name = r.name.clone().unwrap_or_default().trim_start_matches('/').to_string();
        let config = r.config.clone().unwrap_or_default();
        let state = match r.state.as_ref() {
            None => RunState::NotRunning,
            Some(s) => match s.status {
                Some(ContainerStateStatusEnum::RUNNING) => RunState::Running,
                Some(ContainerStateStatusEnum::PAUSED) => RunState::Paused,
                Some(ContainerStateStatusEnum::STOPPING) => RunState::Stopping,
                Some(ContainerStateStatusEnum::RESTARTING) => RunState::Restarting,
                Some(_) => RunState::NotRunning,
                None if s.running == Some(true) => RunState::Running,
                None => RunState::NotRunning,
            },
        };
        let health = match r.state.as_ref().and_then(|s| s.health.as_ref()).and_then(|h| h.status) {
            Some(HealthStatusEnum::STARTING) => Some(HealthState::Starting),
            Some(HealthStatusEnum::HEALTHY) => Some(HealthState::Healthy),
            Some(HealthStatusEnum::UNHEALTHY) => Some(HealthState::Unhealthy),
            _ => None,
        };
        let env = config
            .env
            .unwrap_or_default()
            .into_iter()
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (kv, String::new()),
            })
            .collect();
        let network_mode = r.host_config.as_ref().and_then(|h| h.network_mode.clone()).unwrap_or_default();
        let settings = r.network_settings.clone().unwrap_or_default();

        let mut published = Vec::new();
        let mut exposed: Vec<(u16, Protocol)> =
            config.exposed_ports.unwrap_or_default().iter().filter_map(|p| parse_port_proto(p)).collect();
        let mut ports: Vec<_> = settings.ports.unwrap_or_default().into_iter().collect();
        ports.sort_by(|a, b| a.0.cmp(&b.0));
        for (key, bindings) in ports {
            let Some((port, protocol)) = parse_port_proto(&key) else { continue };
            if !exposed.contains(&(port, protocol)) {
                exposed.push((port, protocol));
            }
            for b in bindings.unwrap_or_default() {
                let Some(host_port) = b.host_port.as_deref().and_then(|p| p.parse::<u16>().ok()).filter(|p| *p != 0) else {
                    continue;
                };
                let host_ip = b.host_ip.as_deref().and_then(|s| s.parse::<IpAddr>().ok()).filter(|ip| !ip.is_unspecified());
                let p = Published { port, protocol, host_ip, host_port };
                if !published.contains(&p) {
                    published.push(p);
                }
            }
        }
        exposed.sort();
        exposed.dedup();

        let mut ips = Vec::new();
        let mut networks: Vec<_> = settings.networks.unwrap_or_default().into_iter().collect();
        networks.sort_by(|a, b| a.0.cmp(&b.0));
        for (net, ep) in networks {
            for addr in [ep.ip_address, ep.global_ipv6_address].into_iter().flatten() {
                if let Ok(ip) = addr.parse::<IpAddr>() {
                    ips.push((net.clone(), ip));
                }
            }
        }

        let stop_timeout = config.stop_timeout.filter(|t| *t >= 0).map(|t| Duration::from_secs(t as u64)).unwrap_or(DEFAULT_STOP_TIMEOUT);
        Ok(ContainerInfo {
            id,
            name,
            image: config.image.unwrap_or_default(),
            state,
            labels: config.labels.unwrap_or_default().into_iter().collect(),
            env,
            network_mode,
            published,
            exposed,
            ips,
            stop_timeout,
            stop_signal: config.stop_signal.filter(|s| !s.is_empty()),
            health,
        })
    }

    pub fn is_host_network(&self) -> bool {
        self.network_mode == "host"
    }

    /// Whether `signal` (as an event's `signal` attribute: `15`, `SIGTERM`, `TERM`) stops the
    /// container: its stop signal, or TERM/INT/QUIT/KILL.
    pub fn is_stop_signal(&self, signal: &str) -> bool {
        let norm = |s: &str| -> String {
            let s = s.trim().to_ascii_uppercase();
            let s = s.strip_prefix("SIG").unwrap_or(&s).to_string();
            match s.as_str() {
                "2" => "INT".into(),
                "3" => "QUIT".into(),
                "9" => "KILL".into(),
                "15" => "TERM".into(),
                _ => s,
            }
        };
        let sig = norm(signal);
        if let Some(own) = &self.stop_signal {
            if norm(own) == sig {
                return true;
            }
        }
        matches!(sig.as_str(), "TERM" | "INT" | "QUIT" | "KILL")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn inspect(name: &str) -> ContainerInspectResponse {
        let path = format!("{}/testdata/{name}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} does not parse as an inspect answer: {e}"))
    }

    #[test]
    fn podman_host_network_container() {
        let c = ContainerInfo::from_inspect(&inspect("podman-inspect-host.json")).expect("valid");
        assert_eq!(c.name, "web1");
        assert_eq!(c.state, RunState::Running);
        assert!(c.is_host_network());
        assert_eq!(c.labels.get("SERVICE_NAME").map(String::as_str), Some("web"));
        assert!(c.env.contains(&("SERVICE_TAGS".to_string(), "a,b".to_string())));
        assert!(c.published.is_empty());
        assert_eq!(c.stop_timeout, Duration::from_secs(10));
        assert!(c.is_stop_signal("15") && c.is_stop_signal("SIGKILL") && !c.is_stop_signal("HUP"));
    }

    #[test]
    fn podman_bridge_container_with_published_and_exposed_ports() {
        let c = ContainerInfo::from_inspect(&inspect("podman-inspect-bridge.json")).expect("valid");
        assert_eq!(
            c.published,
            vec![Published { port: 80, protocol: Protocol::Tcp, host_ip: Some("127.0.0.1".parse().unwrap()), host_port: 18082 }]
        );
        assert_eq!(c.exposed, vec![(80, Protocol::Tcp), (9000, Protocol::Tcp)]);
        assert_eq!(c.ips, vec![("podman".to_string(), "10.88.0.2".parse().unwrap())]);
    }

    #[test]
    fn podman_slirp4netns_container_has_no_address_of_its_own() {
        let c = ContainerInfo::from_inspect(&inspect("podman-inspect-slirp.json")).expect("valid");
        assert_eq!(c.network_mode, "slirp4netns");
        assert_eq!(c.published.len(), 1);
        assert!(c.ips.is_empty());
    }

    #[test]
    fn stopping_state_is_recognised() {
        let mut r = inspect("podman-inspect-bridge.json");
        r.state.as_mut().unwrap().status = Some(ContainerStateStatusEnum::STOPPING);
        assert_eq!(ContainerInfo::from_inspect(&r).unwrap().state, RunState::Stopping);
    }

    #[test]
    fn podman_only_states_are_mapped() {
        let mut v: serde_json::Value = serde_json::to_value(inspect("podman-inspect-host.json")).unwrap();
        v["State"]["Status"] = "stopped".into();
        let text = v.to_string();
        assert!(serde_json::from_str::<ContainerInspectResponse>(&text).is_err(), "bollard accepts `stopped` now");
        let r = parse_lenient_inspect(&text).expect("mapped");
        assert_eq!(ContainerInfo::from_inspect(&r).unwrap().state, RunState::NotRunning);
        v["State"]["Status"] = "configured".into();
        assert!(parse_lenient_inspect(&v.to_string()).is_ok());
        assert!(parse_lenient_inspect("{").is_err());
    }

    #[test]
    fn docker_bridge_container_with_health_check() {
        // Captured from Docker Engine 20.10 (`docker inspect`): a user bridge network, port 80
        // published on 127.0.0.1:18082, `--expose 9000`, `--stop-timeout 7`, HEALTHCHECK failing.
        let r = inspect("docker-inspect-bridge.json");
        let c = ContainerInfo::from_inspect(&r).expect("valid");
        assert_eq!(c.name, "web-pub");
        assert_eq!(c.state, RunState::Running);
        assert_eq!(c.health, Some(HealthState::Unhealthy));
        assert_eq!(
            c.published,
            vec![Published { port: 80, protocol: Protocol::Tcp, host_ip: Some("127.0.0.1".parse().unwrap()), host_port: 18082 }]
        );
        assert_eq!(c.exposed, vec![(80, Protocol::Tcp), (9000, Protocol::Tcp)]);
        assert_eq!(c.ips, vec![("upsync-cap-net".to_string(), "172.18.0.2".parse().unwrap())]);
        assert_eq!(c.stop_timeout, Duration::from_secs(7));
        let mut v = serde_json::to_value(&r).unwrap();
        for (status, want) in [("starting", Some(HealthState::Starting)), ("healthy", Some(HealthState::Healthy)), ("none", None)] {
            v["State"]["Health"]["Status"] = status.into();
            let r: ContainerInspectResponse = serde_json::from_value(v.clone()).unwrap();
            assert_eq!(ContainerInfo::from_inspect(&r).unwrap().health, want, "{status}");
        }
        // A status bollard does not know (podman's "") is read as no health check.
        v["State"]["Health"]["Status"] = "checking".into();
        let r = parse_lenient_inspect(&v.to_string()).expect("mapped");
        assert_eq!(ContainerInfo::from_inspect(&r).unwrap().health, None);
        // Without a health check, podman's captured answers have none.
        assert_eq!(ContainerInfo::from_inspect(&inspect("podman-inspect-host.json")).unwrap().health, None);
    }

    #[test]
    fn port_keys_parse() {
        assert_eq!(parse_port_proto("80/tcp"), Some((80, Protocol::Tcp)));
        assert_eq!(parse_port_proto("53/UDP"), Some((53, Protocol::Udp)));
        assert_eq!(parse_port_proto("8080"), Some((8080, Protocol::Tcp)));
        assert_eq!(parse_port_proto("0/tcp"), None);
        assert_eq!(parse_port_proto("x/tcp"), None);
        assert_eq!(parse_port_proto("9/sctp"), None);
    }
}
