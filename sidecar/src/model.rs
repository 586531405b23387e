//! What the sidecar registers: one [`EndpointSpec`] per (service, address, port), whether it
//! comes from a container or from the scheduler API, and the validation rules both share.
use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use upsync_discovery::upsync::kv_key;
use upsync_discovery::{Endpoint, Host};

/// Defaults for attributes a container or an API call does not set (the module's defaults).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Defaults {
    pub weight: u32,
    pub max_fails: u32,
    pub fail_timeout: u32,
    pub check_interval: Duration,
    pub check_timeout: Duration,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            weight: 1,
            max_fails: 2,
            fail_timeout: 10,
            check_interval: Duration::from_secs(10),
            check_timeout: Duration::from_secs(5),
        }
    }
}

impl Defaults {
    pub fn validate(&self) -> Result<(), String> {
        validate_weight(self.weight).map_err(|e| format!("weight: {e}"))?;
        validate_max_fails(self.max_fails).map_err(|e| format!("max_fails: {e}"))?;
        validate_fail_timeout(self.fail_timeout).map_err(|e| format!("fail_timeout: {e}"))?;
        validate_check_duration(self.check_interval).map_err(|e| format!("check_interval: {e}"))?;
        validate_check_duration(self.check_timeout).map_err(|e| format!("check_timeout: {e}"))?;
        Ok(())
    }
}

/// Parses where an endpoint is reachable: an IP address other hosts can connect to, or a DNS
/// host name.
pub fn parse_host(s: &str) -> Result<Host, String> {
    let host = Host::parse(s.trim())?;
    if let Host::Ip(ip) = host {
        if ip.is_unspecified() || ip.is_multicast() {
            return Err(format!("`{s}` cannot be connected to"));
        }
    }
    Ok(host)
}

/// `ADDR:PORT` as nginx and the upsync KV keys write it (`[v6]:port`).
pub fn host_port(host: &Host, port: u16) -> String {
    Endpoint::new(host.clone(), port).addr()
}

mod host_serde {
    use super::*;
    pub fn serialize<S: serde::Serializer>(h: &Host, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(h)
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Host, D::Error> {
        let s = String::deserialize(d)?;
        parse_host(&s).map_err(serde::de::Error::custom)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// What the Consul check of an endpoint probes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// HTTP GET of this URL; a path alone means `http://ADDRESS:PORT/path`.
    Http(String),
    /// TCP connect to ADDRESS:PORT.
    Tcp,
    /// The application reports itself (`PUT /v1/agent/check/pass/service:ID`) within this period.
    Ttl(#[serde(with = "upsync_discovery::duration::serde")] Duration),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckSpec {
    pub kind: CheckKind,
    #[serde(with = "upsync_discovery::duration::serde")]
    pub interval: Duration,
    #[serde(with = "upsync_discovery::duration::serde")]
    pub timeout: Duration,
    #[serde(default, with = "upsync_discovery::duration::serde_opt", skip_serializing_if = "Option::is_none")]
    pub deregister_after: Option<Duration>,
}

/// Who asked for an endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Source {
    /// The scheduler API (`PUT /v1/endpoints/...`).
    Api,
    /// A running container.
    Container { id: String, name: String },
}

/// One endpoint this node registers: a Consul agent service (id `id`) and an upsync KV entry
/// `PREFIX/service/address:port`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointSpec {
    pub service: String,
    pub id: String,
    #[serde(with = "host_serde")]
    pub address: Host,
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
    pub weight: u32,
    pub max_fails: u32,
    pub fail_timeout: u32,
    #[serde(default)]
    pub backup: bool,
    /// Registered but marked down by whoever registered it (not a drain).
    #[serde(default)]
    pub down: bool,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckSpec>,
    pub source: Source,
}

impl EndpointSpec {
    /// `PREFIX/SERVICE/ADDR:PORT`, or `None` for UDP ports (nginx upstreams are TCP).
    pub fn kv_key(&self, prefix: &str) -> Option<String> {
        match self.protocol {
            Protocol::Tcp => Some(kv_key(&format!("{prefix}/{}", self.service), &self.address, self.port)),
            Protocol::Udp => None,
        }
    }

    /// `ADDR:PORT`.
    pub fn addr(&self) -> String {
        host_port(&self.address, self.port)
    }

    pub fn container_id(&self) -> Option<&str> {
        match &self.source {
            Source::Container { id, .. } => Some(id),
            Source::Api => None,
        }
    }
}

/// Durations in the API and the configuration: one syntax with upsync-dns and Consul
/// ([`upsync_discovery::duration`]).
pub use upsync_discovery::duration::{format_go as format_go_duration, parse as parse_go_duration};

// ---- validation shared by the API, the container labels and the configuration ----

fn check_chars(s: &str, max: usize, allowed: impl Fn(char) -> bool, rule: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > max {
        return Err(format!("longer than {max} characters"));
    }
    if let Some(c) = s.chars().find(|c| !allowed(*c)) {
        return Err(format!("character {c:?} is not allowed ({rule})"));
    }
    Ok(())
}

/// Service names are DNS labels: letters, digits, `-` and `_`, up to 63 characters, starting
/// with a letter or digit (upsync-dns and Consul DNS answer for them).
pub fn validate_service_name(s: &str) -> Result<(), String> {
    check_chars(s, 63, |c| c.is_ascii_alphanumeric() || c == '-' || c == '_', "letters, digits, - and _")?;
    if !s.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err("must start with a letter or a digit".into());
    }
    Ok(())
}

/// Endpoint (Consul service) ids: letters, digits and `-_.:@`, up to 128 characters; not `.`
/// or `..` (the id ends KV keys and URL paths, where those name other entries). `/`, `%`
/// (so `%2F` decoded or not) and control characters are refused by the character rule.
pub fn validate_endpoint_id(s: &str) -> Result<(), String> {
    if s == "." || s == ".." {
        return Err(format!("`{s}` is not allowed (it names a path, not an endpoint)"));
    }
    check_chars(s, 128, |c| c.is_ascii_alphanumeric() || "-_.:@".contains(c), "letters, digits and -_.:@")
}

/// Cloud metadata addresses (AWS, GCP, Azure, OpenStack: 169.254.169.254; AWS IPv6:
/// fd00:ec2::254). A check or a proxy sent there leaks the host's credentials.
pub const METADATA_ADDRESSES: [std::net::IpAddr; 2] = [
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(169, 254, 169, 254)),
    std::net::IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
];

/// Why an address given to the API must not be registered unless the operator allows it
/// (`--allow-address`): loopback (nginx on another host would connect to itself), link-local
/// (not routed) and cloud metadata addresses (credentials). `None` when it may be registered.
pub fn forbidden_address(host: &Host, allowed: &[ipnet::IpNet]) -> Option<String> {
    let ip = match host {
        Host::Ip(ip) => ip.to_canonical(),
        Host::Name(n) if n == "localhost" || n.ends_with(".localhost") => {
            let lo = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
            if allowed.iter().any(|net| net.contains(&lo)) {
                return None;
            }
            return Some(format!("`{n}` is a loopback name; allow it with --allow-address 127.0.0.0/8 if that is meant"));
        }
        Host::Name(_) => return None,
    };
    if allowed.iter().any(|net| net.contains(&ip)) {
        return None;
    }
    let what = if METADATA_ADDRESSES.contains(&ip) {
        "a cloud metadata address"
    } else if ip.is_loopback() {
        "a loopback address"
    } else {
        match ip {
            std::net::IpAddr::V4(v4) if v4.is_link_local() => "a link-local address",
            std::net::IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => "a link-local address",
            _ => return None,
        }
    };
    Some(format!("`{ip}` is {what}; allow it with --allow-address {ip} if that is meant"))
}

/// Node ids: letters, digits and `-_.`, up to 63 characters.
pub fn validate_node_id(s: &str) -> Result<(), String> {
    check_chars(s, 63, |c| c.is_ascii_alphanumeric() || "-_.".contains(c), "letters, digits and -_.")
}

pub fn validate_tag(s: &str) -> Result<(), String> {
    check_chars(s, 255, |c| !c.is_control() && !c.is_whitespace(), "no spaces or control characters")
}

/// Consul's rules for service meta: keys `[A-Za-z0-9_-]` up to 128 characters, not starting with
/// `consul-`; values up to 512 characters; at most 64 pairs. Keys starting with `upsync-` are
/// the sidecar's own.
pub fn validate_meta(meta: &BTreeMap<String, String>) -> Result<(), (String, String)> {
    if meta.len() > 60 {
        return Err(("meta".into(), format!("{} keys; Consul allows 64 and the sidecar uses 4", meta.len())));
    }
    for (k, v) in meta {
        check_chars(k, 128, |c| c.is_ascii_alphanumeric() || c == '-' || c == '_', "letters, digits, - and _")
            .map_err(|e| (format!("meta.{k}"), format!("key {e}")))?;
        if k.starts_with("consul-") || k.starts_with(META_PREFIX) {
            return Err((format!("meta.{k}"), format!("keys starting with consul- or {META_PREFIX} are reserved")));
        }
        if v.len() > 512 {
            return Err((format!("meta.{k}"), "value longer than 512 characters".into()));
        }
    }
    Ok(())
}

pub fn validate_weight(w: u32) -> Result<(), String> {
    if (1..=10_000).contains(&w) {
        Ok(())
    } else {
        Err(format!("{w} is out of range 1..10000"))
    }
}

pub fn validate_max_fails(m: u32) -> Result<(), String> {
    if m <= 10_000 {
        Ok(())
    } else {
        Err(format!("{m} is out of range 0..10000"))
    }
}

pub fn validate_fail_timeout(t: u32) -> Result<(), String> {
    if t <= 86_400 {
        Ok(())
    } else {
        Err(format!("{t} seconds is out of range 0..86400"))
    }
}

pub fn validate_check_duration(d: Duration) -> Result<(), String> {
    if d < Duration::from_millis(100) || d > Duration::from_secs(86_400) {
        Err(format!("{} is out of range 100ms..24h", format_go_duration(d)))
    } else {
        Ok(())
    }
}

/// KV prefixes: `/`-separated non-empty segments of printable characters.
pub fn validate_kv_prefix(p: &str) -> Result<(), String> {
    if p.is_empty() {
        return Err("must not be empty".into());
    }
    for seg in p.split('/') {
        if seg.is_empty() || seg == "." || seg == ".." {
            return Err(format!("segment `{seg}` is not allowed"));
        }
        if seg.chars().any(|c| c.is_control() || c.is_whitespace() || c == '?' || c == '#' || c == '%') {
            return Err(format!("segment `{seg}` has spaces, control characters or one of ?#%"));
        }
    }
    Ok(())
}

/// Prefix of the service meta keys the sidecar sets itself.
pub const META_PREFIX: &str = "upsync-";
/// Meta key: the node id of the sidecar that owns a service.
pub const META_NODE: &str = "upsync-node";
/// Meta key: `api` or `container`.
pub const META_SOURCE: &str = "upsync-source";
/// Meta key: the container's name, for container endpoints.
pub const META_CONTAINER: &str = "upsync-container";
/// Meta key: fingerprint of the registration, so reconciling notices a changed service.
pub const META_HASH: &str = "upsync-hash";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_render_like_nginx() {
        let hp = |s: &str, port| host_port(&parse_host(s).unwrap(), port);
        assert_eq!(hp("10.0.0.1", 80), "10.0.0.1:80");
        assert_eq!(hp("::1", 80), "[::1]:80");
        assert_eq!(hp("Web-1.Example.com", 8080), "web-1.example.com:8080");
        assert!(parse_host("0.0.0.0").is_err());
        assert!(parse_host("bad host!").is_err());
        assert!(parse_host("").is_err());
    }

    #[test]
    fn durations_round_trip_in_go_syntax() {
        assert_eq!(format_go_duration(Duration::from_secs(10)), "10s");
        assert_eq!(format_go_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(parse_go_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_go_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_go_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_go_duration("soon").is_err());
    }

    #[test]
    fn names_and_meta_follow_consul_rules() {
        assert!(validate_service_name("web_api-2").is_ok());
        assert!(validate_service_name("-web").is_err());
        assert!(validate_service_name("web.v2").is_err());
        assert!(validate_service_name(&"a".repeat(64)).is_err());
        assert!(validate_endpoint_id("node-1:web1:80").is_ok());
        for bad in ["a/b", ".", "..", "a%2Fb", "a\u{0}b", "a\nb"] {
            assert!(validate_endpoint_id(bad).is_err(), "{bad:?}");
        }
        assert!(validate_endpoint_id("a..b").is_ok());
        let mut meta = BTreeMap::new();
        meta.insert("version".to_string(), "1.2".to_string());
        assert!(validate_meta(&meta).is_ok());
        meta.insert("consul-x".to_string(), "1".to_string());
        assert_eq!(validate_meta(&meta).unwrap_err().0, "meta.consul-x");
    }

    #[test]
    fn loopback_link_local_and_metadata_addresses_need_allowing() {
        let h = |s: &str| parse_host(s).unwrap();
        for a in ["127.0.0.1", "::1", "169.254.10.1", "fe80::1", "169.254.169.254", "fd00:ec2::254", "::ffff:127.0.0.1", "localhost"] {
            assert!(forbidden_address(&h(a), &[]).is_some(), "{a}");
        }
        for a in ["10.0.0.1", "192.0.2.1", "2001:db8::1", "web.example.com"] {
            assert!(forbidden_address(&h(a), &[]).is_none(), "{a}");
        }
        let lo: Vec<ipnet::IpNet> = vec!["127.0.0.0/8".parse().unwrap()];
        assert!(forbidden_address(&h("127.0.0.5"), &lo).is_none());
        assert!(forbidden_address(&h("localhost"), &lo).is_none());
        assert!(forbidden_address(&h("169.254.169.254"), &lo).unwrap().contains("metadata"));
    }

    #[test]
    fn kv_keys_use_the_address_and_skip_udp() {
        let mut spec = crate::target::tests::spec("n:web:80", "::1", 8080);
        assert_eq!(spec.kv_key("upstreams").as_deref(), Some("upstreams/web/[::1]:8080"));
        spec.protocol = Protocol::Udp;
        assert_eq!(spec.kv_key("upstreams"), None);
    }
}
