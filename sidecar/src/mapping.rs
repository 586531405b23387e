//! A container becomes endpoints by registrator's conventions, so its users can switch:
//!
//! - `SERVICE_*` keys come from the environment and the labels; labels win. Keys are matched
//!   case-insensitively after the prefix (`SERVICE_NAME` and `SERVICE_name` are the same).
//! - `SERVICE_<port>_<KEY>` applies to one container port and wins over `SERVICE_<KEY>`.
//! - `NAME` (default: the image's base name, `-<port>` appended when the container has several
//!   ports), `ID` (default `NODE:CONTAINER:PORT`, `:udp` appended for UDP), `TAGS` (comma
//!   separated), `IGNORE` (any value but false/0/no/off), `WEIGHT`, `MAX_FAILS`,
//!   `FAIL_TIMEOUT`, `BACKUP`, `CHECK_HTTP` (path or URL), `CHECK_TCP`, `CHECK_TTL`,
//!   `CHECK_INTERVAL`, `CHECK_TIMEOUT`, `CHECK_DEREGISTER_AFTER`; any other key becomes Consul
//!   service meta (lower-cased, as registrator does).
//! - Published ports register the host address: the binding's own address when the port is
//!   published on one address, else the advertise address. `--internal` registers the
//!   container's own address and its exposed ports. Host-network containers register the
//!   advertise address with their exposed ports and the ports named in `SERVICE_<port>_*` keys
//!   (podman does not report `--expose` for host-network containers).
//!
//! Mapping never fails as a whole: a port whose keys are invalid is skipped with a warning that
//! names the key, and the other ports are registered.
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use upsync_discovery::Host;

use crate::container::ContainerInfo;
use crate::model::{
    parse_go_duration, validate_check_duration, validate_endpoint_id, validate_fail_timeout, validate_max_fails, validate_meta,
    validate_service_name, validate_tag, validate_weight, CheckKind, CheckSpec, Defaults, EndpointSpec, Protocol, Source,
};

/// What mapping needs besides the container.
#[derive(Clone, Debug)]
pub struct MapContext<'a> {
    pub node_id: &'a str,
    pub advertise_ip: IpAddr,
    pub internal: bool,
    pub defaults: &'a Defaults,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Mapped {
    pub endpoints: Vec<EndpointSpec>,
    /// `SERVICE_IGNORE` is set.
    pub ignored: bool,
    /// Problems with the container's keys, each naming the key.
    pub warnings: Vec<String>,
}

/// `SERVICE_*` keys of a container, lower-cased after the prefix; labels override the
/// environment.
fn service_keys(c: &ContainerInfo) -> BTreeMap<String, String> {
    let mut keys = BTreeMap::new();
    let from_env = c.env.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    let from_labels = c.labels.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    for (k, v) in from_env.chain(from_labels) {
        if k.len() > 8 && k[..8].eq_ignore_ascii_case("SERVICE_") {
            keys.insert(k[8..].to_ascii_lowercase(), v.to_string());
        }
    }
    keys
}

/// Splits `80_name` into (80, `name`).
fn port_key(k: &str) -> Option<(u16, &str)> {
    let (p, rest) = k.split_once('_')?;
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) || rest.is_empty() {
        return None;
    }
    Some((p.parse().ok()?, rest))
}

/// Parses a boolean key; `None` when the value is not one.
fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "" | "0" | "false" | "no" | "off" => Some(false),
        "1" | "true" | "yes" | "on" => Some(true),
        _ => None,
    }
}

/// `SERVICE_IGNORE` and `SERVICE_<port>_IGNORE`: registrator ignores on any value; so do we,
/// except the explicit false values.
fn ignore_value(v: &str) -> bool {
    parse_bool(v).unwrap_or(true)
}

/// The image's base name without registry, tag or digest: `docker.io/library/redis:7` → `redis`.
fn image_base_name(image: &str) -> String {
    let no_digest = image.split('@').next().unwrap_or(image);
    let base = no_digest.rsplit('/').next().unwrap_or(no_digest);
    let base = base.split(':').next().unwrap_or(base);
    // Make it a valid service name: anything but letters, digits, - and _ becomes -.
    let cleaned: String = base.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '-' }).collect();
    cleaned.trim_matches('-').to_string()
}

/// Keys the mapping consumes; everything else becomes meta.
const KNOWN: &[&str] = &[
    "name",
    "id",
    "tags",
    "ignore",
    "weight",
    "max_fails",
    "fail_timeout",
    "backup",
    "check_http",
    "check_tcp",
    "check_ttl",
    "check_interval",
    "check_timeout",
    "check_deregister_after",
];

/// One port to register: the container port and where it is reached.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Target {
    port: u16,
    protocol: Protocol,
    address: IpAddr,
    reg_port: u16,
}

fn targets(c: &ContainerInfo, ctx: &MapContext<'_>, keys: &BTreeMap<String, String>, warnings: &mut Vec<String>) -> Vec<Target> {
    let mut out = Vec::new();
    if c.is_host_network() {
        let mut ports = c.exposed.clone();
        for k in keys.keys() {
            if let Some((p, _)) = port_key(k) {
                if p != 0 && !ports.iter().any(|(q, _)| *q == p) {
                    ports.push((p, Protocol::Tcp));
                }
            }
        }
        for (port, protocol) in ports {
            out.push(Target { port, protocol, address: ctx.advertise_ip, reg_port: port });
        }
    } else if ctx.internal {
        // Prefer an IPv4 address; networks are in name order, so the choice is stable.
        let ip = c.ips.iter().map(|(_, ip)| *ip).find(IpAddr::is_ipv4).or_else(|| c.ips.first().map(|(_, ip)| *ip));
        match ip {
            Some(ip) => {
                for (port, protocol) in &c.exposed {
                    out.push(Target { port: *port, protocol: *protocol, address: ip, reg_port: *port });
                }
            }
            None if !c.exposed.is_empty() => warnings.push(format!(
                "container {} has no address on any network (network mode `{}`); with --internal only containers on \
                 bridge, macvlan or overlay networks can be registered",
                c.name, c.network_mode
            )),
            None => {}
        }
    } else {
        for p in &c.published {
            let address = p.host_ip.unwrap_or(ctx.advertise_ip);
            out.push(Target { port: p.port, protocol: p.protocol, address, reg_port: p.host_port });
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The endpoints of a running container.
pub fn map_container(c: &ContainerInfo, ctx: &MapContext<'_>) -> Mapped {
    let mut mapped = Mapped::default();
    let keys = service_keys(c);
    if keys.get("ignore").is_some_and(|v| ignore_value(v)) {
        mapped.ignored = true;
        return mapped;
    }
    let targets = targets(c, ctx, &keys, &mut mapped.warnings);
    let mut ports: Vec<_> = targets.iter().map(|t| (t.port, t.protocol)).collect();
    ports.dedup();
    let several = ports.len() > 1;
    for t in &targets {
        // Global keys, then this port's keys over them.
        let mut k: BTreeMap<&str, &str> =
            keys.iter().filter(|(key, _)| port_key(key).is_none()).map(|(key, v)| (key.as_str(), v.as_str())).collect();
        for (key, v) in &keys {
            if let Some((p, rest)) = port_key(key) {
                if p == t.port {
                    k.insert(rest, v.as_str());
                }
            }
        }
        match endpoint_for(c, ctx, t, &k, several) {
            Ok(Some(ep)) => mapped.endpoints.push(ep),
            Ok(None) => {}
            Err(w) => {
                mapped.warnings.push(format!("container {} port {}/{}: {w}; port not registered", c.name, t.port, t.protocol.as_str()))
            }
        }
    }
    mapped
}

fn endpoint_for(
    c: &ContainerInfo,
    ctx: &MapContext<'_>,
    t: &Target,
    k: &BTreeMap<&str, &str>,
    several: bool,
) -> Result<Option<EndpointSpec>, String> {
    let key_name = |key: &str| format!("SERVICE_{}", key.to_ascii_uppercase());
    if k.get("ignore").is_some_and(|v| ignore_value(v)) {
        return Ok(None);
    }
    let boolean = |key: &str| -> Result<bool, String> {
        match k.get(key) {
            None => Ok(false),
            Some(v) => parse_bool(v).ok_or_else(|| format!("{} `{v}`: not true or false", key_name(key))),
        }
    };
    let name = match k.get("name") {
        Some(n) => n.trim().to_string(),
        None => {
            let base = image_base_name(&c.image);
            let base = if base.is_empty() { c.name.clone() } else { base };
            if several {
                format!("{base}-{}", t.port)
            } else {
                base
            }
        }
    };
    validate_service_name(&name).map_err(|e| format!("{} `{name}`: {e}", key_name("name")))?;
    let udp = if t.protocol == Protocol::Udp { ":udp" } else { "" };
    let id = match k.get("id") {
        Some(id) if several => format!("{}:{}{udp}", id.trim(), t.port),
        Some(id) => id.trim().to_string(),
        None => format!("{}:{}:{}{udp}", ctx.node_id, c.name, t.port),
    };
    validate_endpoint_id(&id).map_err(|e| format!("{} `{id}`: {e}", key_name("id")))?;

    let mut tags: Vec<String> = Vec::new();
    if let Some(v) = k.get("tags") {
        for tag in v.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            validate_tag(tag).map_err(|e| format!("{} `{tag}`: {e}", key_name("tags")))?;
            if !tags.iter().any(|x| x == tag) {
                tags.push(tag.to_string());
            }
        }
    }

    let number = |key: &str, default: u32, check: fn(u32) -> Result<(), String>| -> Result<u32, String> {
        match k.get(key) {
            None => Ok(default),
            Some(v) => {
                let n: u32 = v.trim().parse().map_err(|_| format!("{} `{v}`: not a number", key_name(key)))?;
                check(n).map_err(|e| format!("{}: {e}", key_name(key)))?;
                Ok(n)
            }
        }
    };
    let weight = number("weight", ctx.defaults.weight, validate_weight)?;
    let max_fails = number("max_fails", ctx.defaults.max_fails, validate_max_fails)?;
    let fail_timeout = match k.get("fail_timeout") {
        None => ctx.defaults.fail_timeout,
        Some(v) => {
            let d = parse_go_duration(v).map_err(|e| format!("{}: {e}", key_name("fail_timeout")))?;
            let secs = u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
            validate_fail_timeout(secs).map_err(|e| format!("{}: {e}", key_name("fail_timeout")))?;
            secs
        }
    };
    let backup = boolean("backup")?;

    let duration = |key: &str, default: Duration| -> Result<Duration, String> {
        match k.get(key) {
            None => Ok(default),
            Some(v) => {
                let d = parse_go_duration(v).map_err(|e| format!("{}: {e}", key_name(key)))?;
                validate_check_duration(d).map_err(|e| format!("{}: {e}", key_name(key)))?;
                Ok(d)
            }
        }
    };
    let kind = if let Some(path) = k.get("check_http") {
        let path = path.trim();
        if !(path.starts_with('/') || path.starts_with("http://") || path.starts_with("https://")) {
            return Err(format!("{} `{path}`: give a path starting with / or an http(s):// URL", key_name("check_http")));
        }
        Some(CheckKind::Http(path.to_string()))
    } else if boolean("check_tcp")? {
        Some(CheckKind::Tcp)
    } else if k.contains_key("check_ttl") {
        Some(CheckKind::Ttl(duration("check_ttl", Duration::from_secs(30))?))
    } else {
        None
    };
    let check = match kind {
        None => None,
        Some(kind) => Some(CheckSpec {
            kind,
            interval: duration("check_interval", ctx.defaults.check_interval)?,
            timeout: duration("check_timeout", ctx.defaults.check_timeout)?,
            deregister_after: match k.get("check_deregister_after") {
                None => None,
                Some(_) => Some(duration("check_deregister_after", Duration::from_secs(60))?),
            },
        }),
    };

    let meta: BTreeMap<String, String> =
        k.iter().filter(|(key, _)| !KNOWN.contains(key)).map(|(key, v)| (key.to_string(), v.to_string())).collect();
    validate_meta(&meta).map_err(|(field, e)| format!("{}: {e}", key_name(field.trim_start_matches("meta."))))?;

    Ok(Some(EndpointSpec {
        service: name,
        id,
        address: Host::Ip(t.address),
        port: t.reg_port,
        protocol: t.protocol,
        weight,
        max_fails,
        fail_timeout,
        backup,
        down: false,
        tags,
        meta,
        check,
        source: Source::Container { id: c.id.clone(), name: c.name.clone() },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::{Published, RunState};

    const HOST: &str = "192.0.2.10";

    fn container(labels: &[(&str, &str)], env: &[(&str, &str)]) -> ContainerInfo {
        ContainerInfo {
            id: "c0ffee".into(),
            name: "web1".into(),
            image: "registry.example.com:5000/team/httpd:2.4@sha256:abc".into(),
            state: RunState::Running,
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            network_mode: "bridge".into(),
            published: vec![Published { port: 80, protocol: Protocol::Tcp, host_ip: None, host_port: 32768 }],
            exposed: vec![(80, Protocol::Tcp)],
            ips: vec![("podman".into(), "10.88.0.7".parse().unwrap())],
            stop_timeout: Duration::from_secs(10),
            stop_signal: None,
            health: None,
        }
    }

    fn map(c: &ContainerInfo) -> Mapped {
        map_with(c, false)
    }

    fn map_with(c: &ContainerInfo, internal: bool) -> Mapped {
        let defaults = Defaults::default();
        map_container(c, &MapContext { node_id: "node-a", advertise_ip: HOST.parse().unwrap(), internal, defaults: &defaults })
    }

    #[test]
    fn defaults_follow_registrator() {
        let m = map(&container(&[], &[]));
        assert!(m.warnings.is_empty(), "{:?}", m.warnings);
        let [ep] = m.endpoints.as_slice() else { panic!("{m:?}") };
        assert_eq!(ep.service, "httpd");
        assert_eq!(ep.id, "node-a:web1:80");
        assert_eq!(ep.addr(), "192.0.2.10:32768");
        assert_eq!((ep.weight, ep.max_fails, ep.fail_timeout, ep.backup), (1, 2, 10, false));
        assert_eq!(ep.check, None);
        assert_eq!(ep.source, Source::Container { id: "c0ffee".into(), name: "web1".into() });
    }

    #[test]
    fn labels_win_over_env_and_other_keys_become_meta() {
        let c = container(
            &[("SERVICE_NAME", "api"), ("SERVICE_TAGS", "blue, v2 ,blue"), ("SERVICE_VERSION", "1.4"), ("unrelated", "x")],
            &[("SERVICE_NAME", "ignored-by-label"), ("SERVICE_WEIGHT", "5"), ("SERVICE_Team_Name", "core"), ("PATH", "/bin")],
        );
        let m = map(&c);
        let ep = &m.endpoints[0];
        assert_eq!(ep.service, "api");
        assert_eq!(ep.tags, vec!["blue", "v2"]);
        assert_eq!(ep.weight, 5);
        let meta: Vec<_> = ep.meta.iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(meta, vec!["team_name=core", "version=1.4"]);
    }

    #[test]
    fn upsync_attributes_and_checks() {
        let c = container(
            &[
                ("SERVICE_MAX_FAILS", "3"),
                ("SERVICE_FAIL_TIMEOUT", "30s"),
                ("SERVICE_BACKUP", "true"),
                ("SERVICE_CHECK_HTTP", "/health"),
                ("SERVICE_CHECK_INTERVAL", "2s"),
                ("SERVICE_CHECK_DEREGISTER_AFTER", "1m"),
            ],
            &[],
        );
        let ep = &map(&c).endpoints[0];
        assert_eq!((ep.max_fails, ep.fail_timeout, ep.backup), (3, 30, true));
        let check = ep.check.as_ref().expect("a check");
        assert_eq!(check.kind, CheckKind::Http("/health".into()));
        assert_eq!(check.interval, Duration::from_secs(2));
        assert_eq!(check.timeout, Duration::from_secs(5));
        assert_eq!(check.deregister_after, Some(Duration::from_secs(60)));

        let tcp = &map(&container(&[("SERVICE_CHECK_TCP", "true")], &[])).endpoints[0];
        assert_eq!(tcp.check.as_ref().unwrap().kind, CheckKind::Tcp);
        let ttl = &map(&container(&[("SERVICE_CHECK_TTL", "15s")], &[])).endpoints[0];
        assert_eq!(ttl.check.as_ref().unwrap().kind, CheckKind::Ttl(Duration::from_secs(15)));
    }

    #[test]
    fn ignore_whole_container_or_one_port() {
        assert!(map(&container(&[("SERVICE_IGNORE", "1")], &[])).ignored);
        assert!(map(&container(&[], &[("SERVICE_IGNORE", "yes")])).ignored);
        // Labels win: an explicit false label overrides the environment.
        let m = map(&container(&[("SERVICE_IGNORE", "false")], &[("SERVICE_IGNORE", "true")]));
        assert!(!m.ignored && m.endpoints.len() == 1);

        let mut c = container(&[("SERVICE_9000_IGNORE", "true")], &[]);
        c.published.push(Published { port: 9000, protocol: Protocol::Tcp, host_ip: None, host_port: 32769 });
        let m = map(&c);
        assert_eq!(m.endpoints.len(), 1);
        assert_eq!(m.endpoints[0].port, 32768);
    }

    #[test]
    fn several_ports_get_distinct_names_and_ids() {
        let mut c = container(&[("SERVICE_9000_NAME", "admin"), ("SERVICE_ID", "custom")], &[]);
        c.published.push(Published { port: 9000, protocol: Protocol::Tcp, host_ip: None, host_port: 32769 });
        c.published.push(Published { port: 53, protocol: Protocol::Udp, host_ip: None, host_port: 5353 });
        let m = map(&c);
        let got: Vec<_> = m.endpoints.iter().map(|e| (e.service.as_str(), e.id.as_str(), e.kv_key("up"))).collect();
        assert_eq!(
            got,
            vec![
                ("httpd-53", "custom:53:udp", None),
                ("httpd-80", "custom:80", Some("up/httpd-80/192.0.2.10:32768".to_string())),
                ("admin", "custom:9000", Some("up/admin/192.0.2.10:32769".to_string())),
            ]
        );
    }

    #[test]
    fn port_published_on_one_address_registers_that_address() {
        let mut c = container(&[], &[]);
        c.published = vec![
            Published { port: 80, protocol: Protocol::Tcp, host_ip: Some("127.0.0.1".parse().unwrap()), host_port: 8080 },
            // Docker lists a port published on all addresses once per family.
            Published { port: 443, protocol: Protocol::Tcp, host_ip: None, host_port: 8443 },
            Published { port: 443, protocol: Protocol::Tcp, host_ip: None, host_port: 8443 },
        ];
        let addrs: Vec<_> = map(&c).endpoints.iter().map(|e| e.addr()).collect();
        assert_eq!(addrs, vec!["127.0.0.1:8080", "192.0.2.10:8443"]);
    }

    #[test]
    fn internal_uses_the_container_address_and_exposed_ports() {
        let mut c = container(&[], &[]);
        c.exposed.push((9000, Protocol::Tcp));
        let addrs: Vec<_> = map_with(&c, true).endpoints.iter().map(|e| e.addr()).collect();
        assert_eq!(addrs, vec!["10.88.0.7:80", "10.88.0.7:9000"]);

        c.ips.clear();
        let m = map_with(&c, true);
        assert!(m.endpoints.is_empty());
        assert!(m.warnings[0].contains("no address on any network"), "{:?}", m.warnings);
    }

    #[test]
    fn host_network_registers_exposed_and_named_ports_on_the_advertise_address() {
        let mut c = container(&[("SERVICE_8081_NAME", "web")], &[]);
        c.network_mode = "host".into();
        c.published.clear();
        c.exposed.clear();
        let m = map(&c);
        let got: Vec<_> = m.endpoints.iter().map(|e| (e.service.as_str(), e.addr())).collect();
        assert_eq!(got, vec![("web", "192.0.2.10:8081".to_string())]);
    }

    #[test]
    fn bad_keys_skip_the_port_with_a_warning_naming_the_key() {
        let cases = [
            ("SERVICE_WEIGHT", "heavy", "SERVICE_WEIGHT"),
            ("SERVICE_WEIGHT", "0", "SERVICE_WEIGHT"),
            ("SERVICE_NAME", "no spaces", "SERVICE_NAME"),
            ("SERVICE_CHECK_HTTP", "health", "SERVICE_CHECK_HTTP"),
            ("SERVICE_CHECK_INTERVAL", "1ms", "SERVICE_CHECK_INTERVAL"),
            ("SERVICE_BACKUP", "maybe", "SERVICE_BACKUP"),
            ("SERVICE_CONSUL-X", "1", "SERVICE_CONSUL-X"),
        ];
        for (k, v, needle) in cases {
            let mut labels = vec![(k, v)];
            if k == "SERVICE_CHECK_INTERVAL" {
                labels.push(("SERVICE_CHECK_TCP", "1"));
            }
            let m = map(&container(&labels, &[]));
            assert!(m.endpoints.is_empty(), "{k}={v} was accepted");
            assert!(m.warnings.len() == 1 && m.warnings[0].contains(needle), "{k}={v}: {:?}", m.warnings);
            assert!(m.warnings[0].contains("web1 port 80/tcp"), "{:?}", m.warnings);
        }
    }

    #[test]
    fn captured_podman_container_maps() {
        let c = ContainerInfo::from_inspect(&crate::container::tests::inspect("podman-inspect-slirp.json")).unwrap();
        let m = map(&c);
        let got: Vec<_> = m.endpoints.iter().map(|e| (e.service.as_str(), e.id.as_str(), e.addr())).collect();
        assert_eq!(got, vec![("upsync-httpd", "node-a:web3:80", "127.0.0.1:18083".to_string())]);
    }

    #[test]
    fn image_names() {
        assert_eq!(image_base_name("redis"), "redis");
        assert_eq!(image_base_name("docker.io/library/redis:7"), "redis");
        assert_eq!(image_base_name("localhost:5000/a/b.c:1@sha256:00"), "b-c");
        assert_eq!(image_base_name(""), "");
    }
}
