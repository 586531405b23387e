//! Parsing of the module's directives, in safe code. The FFI layer hands over the directive's
//! arguments as strings; everything here returns either a value or an error message that names
//! the problem (nginx prefixes it with the file and line, and we prefix it with the directive).
//!
//! Syntax (a drop-in for nginx-upsync-module, plus extensions marked *):
//!
//! ```text
//! upsync ADDR[,ADDR...]/PATH [upsync_type=consul|consul_services|consul_health|etcd]
//!        [upsync_interval=TIME] [upsync_timeout=TIME] [strong_dependency=on|off]
//!        [dc=NAME]* [stale|consistent]* [health=down|omit]* [max_body=SIZE]*;
//! upsync_dump_path PATH;
//! upsync_lb round_robin|least_conn|ip_hash|hash_ketama|hash_modula;
//! upsync_token TOKEN;* / upsync_token_file PATH;*
//! upsync_tls ca=PATH [cert=PATH key=PATH];*
//! upsync_allow_empty on|off;*
//! ```
//! `ADDR` is `HOST:PORT`, optionally with `http://` or `https://` in front of the first one.
//! With `upsync_type=etcd`, `PATH` is `/v2/keys/PREFIX` (etcd's v2 API, nginx-upsync-module's
//! syntax) or `/v3/kv/PREFIX` (the v3 API; `/v3/kv//PREFIX` for keys that begin with `/`).
use std::path::PathBuf;
use std::time::Duration;

pub use upsync_discovery::EtcdApi;

/// Where the servers of an upstream come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// `upsync_type=consul`: keys `PREFIX/IP:PORT` under `/v1/kv/PREFIX`.
    Kv { prefix: String },
    /// `upsync_type=consul_services`: `/v1/catalog/service/NAME`.
    CatalogService { name: String },
    /// `upsync_type=consul_health`: `/v1/health/service/NAME`.
    HealthService { name: String, omit_unhealthy: bool },
    /// `upsync_type=etcd`: keys `PREFIX/IP:PORT` under `/v2/keys/PREFIX` (v2: `prefix` without
    /// slashes around it) or `/v3/kv/PREFIX` (v3: `prefix` is the key prefix as stored, without
    /// its trailing `/`).
    Etcd { api: EtcdApi, prefix: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Consistency {
    #[default]
    Default,
    Stale,
    Consistent,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Address {
    pub https: bool,
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Tls {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// The parsed `upsync` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upsync {
    pub addresses: Vec<Address>,
    /// The path as written (for messages), e.g. `/v1/kv/upstreams/app`.
    pub path: String,
    pub source: Source,
    pub interval: Duration,
    pub timeout: Duration,
    pub strong_dependency: bool,
    pub datacenter: Option<String>,
    pub consistency: Consistency,
    /// `max_body=SIZE`: the largest Consul answer accepted (the body is never buffered beyond it).
    pub max_body: usize,
}

/// Everything one upstream block says about syncing, gathered from all directives.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpstreamSync {
    pub upsync: Option<Upsync>,
    pub dump_path: Option<PathBuf>,
    pub token: Option<Token>,
    pub tls: Option<Tls>,
    pub allow_empty: bool,
}

/// An ACL token, or the file to read it from. Debug never shows the token.
#[derive(Clone, PartialEq, Eq)]
pub enum Token {
    Value(String),
    File(PathBuf),
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Token::Value(_) => f.write_str("Token(<redacted>)"),
            Token::File(p) => write!(f, "TokenFile({})", p.display()),
        }
    }
}

/// Defaults. nginx-upsync-module sleeps `upsync_interval` (default 5 s) after every response;
/// we hold blocking queries instead, and `upsync_interval` only sets the rate limit of the poll
/// loop (a token bucket refilled once per interval, see [`BURST`]), so a shorter default costs
/// Consul nothing while changes follow each other quickly.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(500);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(6 * 60);
/// How many polls may follow each other without waiting for the bucket to refill.
pub const BURST: u32 = 10;
/// Largest Consul answer accepted by default. Consul 1.8's compact JSON takes ~130 bytes per
/// KV server and ~1 KB per health instance (`discovery/testdata`), so 64 MiB holds a KV list of
/// ~500,000 servers or a health list of ~60,000 instances, while a runaway answer (a wrong path,
/// a proxy's error page, a hostile peer) costs the leader worker at most this much memory.
pub const DEFAULT_MAX_BODY: usize = 64 << 20;
/// Smallest `max_body`: an answer listing a few servers, with room to spare.
pub const MIN_MAX_BODY: usize = 4 << 10;

/// Parses `upsync`'s arguments (without the directive name).
pub fn parse_upsync(args: &[&str]) -> Result<Upsync, String> {
    let Some((first, params)) = args.split_first() else {
        return Err("needs an address, e.g. \"upsync 127.0.0.1:8500/v1/kv/upstreams/NAME;\"".into());
    };
    let (addresses, path) = parse_target(first)?;
    let mut kind = "consul";
    let mut interval = DEFAULT_INTERVAL;
    let mut timeout = DEFAULT_TIMEOUT;
    let mut strong_dependency = false;
    let mut datacenter = None;
    let mut consistency = Consistency::Default;
    let mut omit_unhealthy = false;
    let mut max_body = DEFAULT_MAX_BODY;
    for p in params {
        if let Some(v) = p.strip_prefix("upsync_type=") {
            kind = match v {
                "consul" | "consul_services" | "consul_health" | "etcd" => v,
                _ => return Err(format!("invalid upsync_type \"{v}\": use consul, consul_services, consul_health or etcd")),
            };
        } else if let Some(v) = p.strip_prefix("upsync_interval=") {
            interval = parse_time(v).map_err(|e| format!("invalid upsync_interval \"{v}\": {e}"))?;
            if interval.is_zero() {
                return Err("upsync_interval must be greater than 0".into());
            }
        } else if let Some(v) = p.strip_prefix("upsync_timeout=") {
            timeout = parse_time(v).map_err(|e| format!("invalid upsync_timeout \"{v}\": {e}"))?;
            if timeout < Duration::from_secs(2) {
                return Err(format!("upsync_timeout={v} is too short: it bounds a Consul blocking query, use at least 2s"));
            }
        } else if let Some(v) = p.strip_prefix("strong_dependency=") {
            strong_dependency = parse_on_off(v).map_err(|e| format!("invalid strong_dependency \"{v}\": {e}"))?;
        } else if let Some(v) = p.strip_prefix("dc=") {
            if v.is_empty() || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.') {
                return Err(format!("invalid dc \"{v}\": a datacenter name has letters, digits, '-', '_' or '.'"));
            }
            datacenter = Some(v.to_string());
        } else if let Some(v) = p.strip_prefix("max_body=") {
            max_body = parse_size(v).map_err(|e| format!("invalid max_body \"{v}\": {e}"))?;
            if max_body < MIN_MAX_BODY {
                return Err(format!("max_body={v} is too small: a Consul answer listing a few servers needs more, use at least 4k"));
            }
        } else if *p == "stale" {
            consistency = Consistency::Stale;
        } else if *p == "consistent" {
            consistency = Consistency::Consistent;
        } else if let Some(v) = p.strip_prefix("health=") {
            omit_unhealthy = match v {
                "down" => false,
                "omit" => true,
                _ => return Err(format!("invalid health \"{v}\": use down (unhealthy servers are marked down) or omit")),
            };
        } else {
            return Err(format!(
                "unknown parameter \"{p}\": expected upsync_type=, upsync_interval=, upsync_timeout=, \
                 strong_dependency=, dc=, stale, consistent, health= or max_body="
            ));
        }
    }
    let source = source_for(kind, &path, omit_unhealthy)?;
    if omit_unhealthy && !matches!(source, Source::HealthService { .. }) {
        return Err("health= applies only to upsync_type=consul_health".into());
    }
    if matches!(source, Source::Etcd { .. }) && (datacenter.is_some() || consistency != Consistency::Default) {
        return Err("dc=, stale and consistent apply only to Consul (etcd reads are linearizable)".into());
    }
    Ok(Upsync { addresses, path, source, interval, timeout, strong_dependency, datacenter, consistency, max_body })
}

fn source_for(kind: &str, path: &str, omit_unhealthy: bool) -> Result<Source, String> {
    let expect = |prefix: &str, example: &str| -> Result<String, String> {
        match path.strip_prefix(prefix) {
            Some(rest) if !rest.trim_matches('/').is_empty() => Ok(rest.trim_end_matches('/').to_string()),
            _ => Err(format!("upsync_type={kind} needs a path like \"{example}\", not \"{path}\"")),
        }
    };
    let etcd_path = path.starts_with("/v2/keys/") || path.starts_with("/v3/kv/");
    if etcd_path && kind != "etcd" {
        return Err(format!("\"{path}\" is an etcd path: add upsync_type=etcd"));
    }
    match kind {
        "consul" => Ok(Source::Kv { prefix: expect("/v1/kv/", "/v1/kv/upstreams/NAME")? }),
        "etcd" => {
            let bad = || {
                format!("upsync_type=etcd needs a path like \"/v2/keys/upstreams/NAME\" (etcd's v2 API) or \"/v3/kv/upstreams/NAME\" (v3), not \"{path}\"")
            };
            let (api, rest) = if let Some(r) = path.strip_prefix("/v2/keys/") {
                (EtcdApi::V2, r.trim_matches('/'))
            } else if let Some(r) = path.strip_prefix("/v3/kv/") {
                (EtcdApi::V3, r.trim_end_matches('/'))
            } else {
                return Err(bad());
            };
            if rest.trim_matches('/').is_empty() {
                return Err(bad());
            }
            Ok(Source::Etcd { api, prefix: rest.to_string() })
        }
        "consul_services" => {
            let name = expect("/v1/catalog/service/", "/v1/catalog/service/NAME")?;
            check_service_name(&name)?;
            Ok(Source::CatalogService { name })
        }
        _ => {
            let name = expect("/v1/health/service/", "/v1/health/service/NAME")?;
            check_service_name(&name)?;
            Ok(Source::HealthService { name, omit_unhealthy })
        }
    }
}

fn check_service_name(name: &str) -> Result<(), String> {
    if name.contains('/') {
        return Err(format!("\"{name}\" is not a service name (it contains '/')"));
    }
    Ok(())
}

/// `[http(s)://]HOST:PORT[,HOST:PORT...]/PATH`.
fn parse_target(s: &str) -> Result<(Vec<Address>, String), String> {
    let (https, rest) = if let Some(r) = s.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = s.strip_prefix("http://") {
        (false, r)
    } else {
        (false, s)
    };
    let Some(slash) = rest.find('/') else {
        return Err(format!("\"{s}\" has no path: write HOST:PORT/v1/kv/PREFIX (or a catalog/health path)"));
    };
    let (hosts, path) = rest.split_at(slash);
    if path.contains('?') || path.contains('#') {
        return Err(format!("\"{path}\" has a query string: use the directive's parameters (dc=, stale, ...) instead"));
    }
    if hosts.contains('@') {
        return Err(format!(
            "\"{hosts}\" has credentials: basic authentication is not used by Consul; give an ACL token with upsync_token"
        ));
    }
    let mut addresses = Vec::new();
    for h in hosts.split(',') {
        let h = h.trim();
        let (h_https, h) = if let Some(x) = h.strip_prefix("https://") {
            (true, x)
        } else if let Some(x) = h.strip_prefix("http://") {
            (false, x)
        } else {
            (https, h)
        };
        addresses.push(parse_host_port(h).map(|(host, port)| Address { https: h_https, host, port })?);
    }
    Ok((addresses, path.to_string()))
}

/// `HOST:PORT` or `[IPv6]:PORT`; the port is required.
pub fn parse_host_port(s: &str) -> Result<(String, u16), String> {
    if s.is_empty() {
        return Err("empty Consul address (two commas, or a comma at the end?)".into());
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some((h, p)) = rest.split_once("]:") else {
            return Err(format!("invalid Consul address \"{s}\": write [IPv6]:PORT"));
        };
        (h, p)
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, p),
            _ => return Err(format!("invalid Consul address \"{s}\": write HOST:PORT (e.g. 127.0.0.1:8500)")),
        }
    };
    if host.is_empty() {
        return Err(format!("invalid Consul address \"{s}\": the host is empty"));
    }
    let port: u16 = match port.parse() {
        Ok(p) if p > 0 => p,
        _ => return Err(format!("invalid port \"{port}\" in Consul address \"{s}\"")),
    };
    Ok((host.to_string(), port))
}

pub fn parse_on_off(v: &str) -> Result<bool, String> {
    match v {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err("it must be \"on\" or \"off\"".into()),
    }
}

/// nginx's time syntax (`ngx_parse_time` with milliseconds allowed): a sequence of
/// NUMBER[UNIT] with units ms, s, m, h, d, w, M (30 days), y (365 days); no unit means seconds.
pub fn parse_time(s: &str) -> Result<Duration, String> {
    if s.is_empty() {
        return Err("empty time".into());
    }
    let mut total_ms: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 {
            return Err(format!("expected a number at \"{rest}\" (e.g. 500ms, 5s, 6m)"));
        }
        let n: u128 = rest[..digits].parse().map_err(|_| "number too large".to_string())?;
        rest = &rest[digits..];
        let (unit_ms, len) = if rest.starts_with("ms") {
            (1, 2)
        } else {
            match rest.chars().next() {
                None => (1000, 0),
                Some('s') => (1000, 1),
                Some('m') => (60_000, 1),
                Some('h') => (3_600_000, 1),
                Some('d') => (86_400_000, 1),
                Some('w') => (7 * 86_400_000, 1),
                Some('M') => (30 * 86_400_000, 1),
                Some('y') => (365 * 86_400_000, 1),
                Some(c) => return Err(format!("unknown time unit '{c}' (use ms, s, m, h, d, w, M or y)")),
            }
        };
        rest = &rest[len..];
        total_ms = total_ms.saturating_add(n.saturating_mul(unit_ms));
    }
    if total_ms > u64::MAX as u128 / 2 {
        return Err("time too large".into());
    }
    Ok(Duration::from_millis(total_ms as u64))
}

/// The fewest connections a Consul client may be given (`upsync_consul_connections`): one for
/// the KV upstreams and one for the catalog and health upstreams, whatever their number.
pub const MIN_CONNECTIONS: usize = 2;
/// Default of `upsync_consul_connections`.
pub const DEFAULT_CONNECTIONS: usize = 4;
/// Upper bound of `upsync_consul_connections` (Consul's per-client default is 200).
pub const MAX_CONNECTIONS: usize = 64;

/// `upsync_consul_connections N`: the most connections to Consul per client (see the module's
/// watch plan, module/src/plan.rs).
pub fn parse_connections(v: &str) -> Result<usize, String> {
    match v.parse::<usize>() {
        Ok(n) if (MIN_CONNECTIONS..=MAX_CONNECTIONS).contains(&n) => Ok(n),
        _ => Err(format!(
            "\"{v}\" is not a number of connections from {MIN_CONNECTIONS} to {MAX_CONNECTIONS} (Consul refuses every client of an address beyond its http_max_conns_per_client, 200 by default)"
        )),
    }
}

/// nginx's size syntax (`ngx_parse_size`): NUMBER with an optional k/K/m/M/g/G suffix.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let (num, mul) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1024),
        Some('m' | 'M') => (&s[..s.len() - 1], 1024 * 1024),
        Some('g' | 'G') => (&s[..s.len() - 1], 1024 * 1024 * 1024),
        _ => (s, 1),
    };
    let n: usize = num.parse().map_err(|_| format!("invalid size \"{s}\" (e.g. 32m)"))?;
    n.checked_mul(mul).ok_or_else(|| format!("size \"{s}\" is too large"))
}

/// `upsync_lb`: nginx-upsync-module's balancer choice. Round robin is nginx's default; the others
/// map onto nginx's own directives so the balancing stays nginx's code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lb {
    RoundRobin,
    LeastConn,
    IpHash,
    /// nginx's `hash KEY consistent;` in the same block (nginx-upsync-module's spelling: the
    /// ring is rebuilt with every synced list).
    HashKetama,
    /// nginx's `hash KEY;` in the same block.
    HashModula,
}

/// `nginx -t`'s refusal of `server NAME resolve` (nginx >= 1.27.3) in a synced upstream, HTTP or
/// stream: nginx's resolver would keep editing peers of a list upsync replaces.
pub fn resolve_refusal(upstream: &str, server: &str) -> String {
    format!(
        "upstream \"{upstream}\": server \"{server}\" has \"resolve\": nginx's resolver would keep editing peers of a \
         list upsync replaces with the one from Consul; remove \"resolve\" (and \"service=\") from the servers of this \
         upstream, or move that server to an upstream without upsync"
    )
}

/// What an upstream block says about nginx's `hash` directive, checked against `upsync_lb`.
pub fn check_hash_lb(lb: Option<Lb>, hash: bool, consistent: bool) -> Result<(), String> {
    match lb {
        Some(Lb::HashKetama) if !consistent => {
            Err("\"upsync_lb hash_ketama\" needs nginx's \"hash KEY consistent;\" in the same upstream block".into())
        }
        Some(Lb::HashModula) if !hash || consistent => {
            Err("\"upsync_lb hash_modula\" needs nginx's \"hash KEY;\" (without \"consistent\") in the same upstream block".into())
        }
        _ => Ok(()),
    }
}

/// Whether a synced upstream gets a consistent-hash ring with every list, after checking
/// `upsync_lb` against nginx's `hash` in the block (`hash`: it has a key; `consistent`: nginx's
/// init built a ring). `ring_built_lazily`: nginx >= 1.27.3 in an upstream with `zone`, where
/// nginx builds no ring at configuration time (it builds one on the first request), so `hash
/// KEY` and `hash KEY consistent` look the same: the ring is installed in any case (a plain
/// `hash` never reads it) and `upsync_lb` is taken at its word for which of the two it is.
pub fn hash_ring(lb: Option<Lb>, hash: bool, consistent: bool, ring_built_lazily: bool) -> Result<bool, String> {
    let ring_unknown = ring_built_lazily && hash && !consistent;
    let consistent_checked = if ring_unknown { lb == Some(Lb::HashKetama) } else { consistent };
    check_hash_lb(lb, hash, consistent_checked)?;
    Ok(consistent || ring_unknown)
}

pub fn parse_lb(v: &str) -> Result<Lb, String> {
    match v {
        "round_robin" => Ok(Lb::RoundRobin),
        "least_conn" => Ok(Lb::LeastConn),
        "ip_hash" => Ok(Lb::IpHash),
        "hash_ketama" => Ok(Lb::HashKetama),
        "hash_modula" => Ok(Lb::HashModula),
        _ => Err(format!("invalid value \"{v}\": use round_robin, least_conn, ip_hash, hash_ketama or hash_modula")),
    }
}

/// `upsync_tls ca=PATH [cert=PATH key=PATH]`.
pub fn parse_tls(args: &[&str]) -> Result<Tls, String> {
    let mut tls = Tls::default();
    for a in args {
        if let Some(v) = a.strip_prefix("ca=") {
            tls.ca_file = Some(non_empty_path("ca", v)?);
        } else if let Some(v) = a.strip_prefix("cert=") {
            tls.cert_file = Some(non_empty_path("cert", v)?);
        } else if let Some(v) = a.strip_prefix("key=") {
            tls.key_file = Some(non_empty_path("key", v)?);
        } else {
            return Err(format!("unknown parameter \"{a}\": expected ca=PATH, cert=PATH or key=PATH"));
        }
    }
    if tls.cert_file.is_some() != tls.key_file.is_some() {
        return Err("cert= and key= go together (a client certificate needs its key)".into());
    }
    Ok(tls)
}

fn non_empty_path(what: &str, v: &str) -> Result<PathBuf, String> {
    if v.is_empty() {
        return Err(format!("{what}= needs a file path"));
    }
    Ok(PathBuf::from(v))
}

/// Checks done once the whole upstream block is known.
pub fn validate_block(s: &UpstreamSync) -> Result<(), String> {
    let Some(u) = &s.upsync else {
        if s.dump_path.is_some() || s.token.is_some() || s.tls.is_some() || s.allow_empty {
            return Err(
                "upsync_dump_path, upsync_token, upsync_tls and upsync_allow_empty need an \"upsync\" line in the same upstream block"
                    .into(),
            );
        }
        return Ok(());
    };
    if matches!(u.source, Source::Etcd { .. }) && s.token.is_some() {
        return Err("upsync_token and upsync_token_file apply only to Consul (etcd authentication is not supported)".into());
    }
    if s.tls.is_some() && u.addresses.iter().any(|a| !a.https) && u.addresses.iter().any(|a| a.https) {
        return Err("mixing http:// and https:// Consul addresses in one upsync line is not supported".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(args: &str) -> Result<Upsync, String> {
        parse_upsync(&args.split_whitespace().collect::<Vec<_>>())
    }

    #[test]
    fn upsync_as_nginx_upsync_module_writes_it() {
        let u = up("127.0.0.1:8500/v1/kv/upstreams/test upsync_timeout=6m upsync_interval=500ms upsync_type=consul strong_dependency=off")
            .unwrap();
        assert_eq!(u.addresses, vec![Address { https: false, host: "127.0.0.1".into(), port: 8500 }]);
        assert_eq!(u.source, Source::Kv { prefix: "upstreams/test".into() });
        assert_eq!(u.timeout, Duration::from_secs(360));
        assert_eq!(u.interval, Duration::from_millis(500));
        assert!(!u.strong_dependency);
        assert_eq!(u.consistency, Consistency::Default);
    }

    #[test]
    fn defaults_and_extensions() {
        let u = up("https://10.0.0.1:8501,10.0.0.2:8501/v1/health/service/web/ upsync_type=consul_health dc=dc2 stale health=omit strong_dependency=on").unwrap();
        assert_eq!(u.addresses.len(), 2);
        assert!(u.addresses.iter().all(|a| a.https));
        assert_eq!(u.source, Source::HealthService { name: "web".into(), omit_unhealthy: true });
        assert_eq!(u.datacenter.as_deref(), Some("dc2"));
        assert_eq!(u.consistency, Consistency::Stale);
        assert!(u.strong_dependency);
        let d = up("127.0.0.1:8500/v1/catalog/service/api upsync_type=consul_services").unwrap();
        assert_eq!(d.interval, DEFAULT_INTERVAL);
        assert_eq!(d.timeout, DEFAULT_TIMEOUT);
        assert_eq!(d.max_body, DEFAULT_MAX_BODY);
        assert_eq!(d.source, Source::CatalogService { name: "api".into() });
        let v6 = up("[::1]:8500/v1/kv/x").unwrap();
        assert_eq!(v6.addresses[0].host, "::1");
        assert_eq!(v6.addresses[0].to_string(), "http://[::1]:8500");
    }

    #[test]
    fn errors_name_the_problem() {
        let cases = [
            ("127.0.0.1:8500", "has no path"),
            ("127.0.0.1/v1/kv/x", "HOST:PORT"),
            ("127.0.0.1:0/v1/kv/x", "invalid port"),
            ("127.0.0.1:99999/v1/kv/x", "invalid port"),
            ("127.0.0.1:8500,/v1/kv/x", "empty Consul address"),
            ("127.0.0.1:8500/v1/kv/", "needs a path like"),
            ("127.0.0.1:8500/v1/catalog/service/x", "needs a path like \"/v1/kv"),
            ("127.0.0.1:8500/v1/kv/x upsync_type=consul_services", "/v1/catalog/service/NAME"),
            ("127.0.0.1:2379/v1/kv/x upsync_type=etcd", "needs a path like \"/v2/keys/upstreams/NAME\""),
            ("127.0.0.1:2379/v2/keys/ upsync_type=etcd", "needs a path like"),
            ("127.0.0.1:2379/v3/kv// upsync_type=etcd", "needs a path like"),
            ("127.0.0.1:2379/v3/kv/x", "is an etcd path: add upsync_type=etcd"),
            ("127.0.0.1:2379/v2/keys/x upsync_type=etcd dc=dc1", "apply only to Consul"),
            ("127.0.0.1:2379/v3/kv/x upsync_type=etcd stale", "apply only to Consul"),
            ("127.0.0.1:8500/v1/kv/x upsync_type=zookeeper", "invalid upsync_type"),
            ("127.0.0.1:8500/v1/kv/x upsync_timeout=abc", "invalid upsync_timeout \"abc\""),
            ("127.0.0.1:8500/v1/kv/x upsync_timeout=1s", "too short"),
            ("127.0.0.1:8500/v1/kv/x upsync_interval=5x", "unknown time unit"),
            ("127.0.0.1:8500/v1/kv/x upsync_interval=0", "greater than 0"),
            ("127.0.0.1:8500/v1/kv/x strong_dependency=yes", "\"on\" or \"off\""),
            ("127.0.0.1:8500/v1/kv/x dc=a/b", "invalid dc"),
            ("127.0.0.1:8500/v1/kv/x health=omit", "only to upsync_type=consul_health"),
            ("127.0.0.1:8500/v1/kv/x foo=bar", "unknown parameter \"foo=bar\""),
            ("127.0.0.1:8500/v1/kv/x max_body=lots", "invalid max_body \"lots\""),
            ("127.0.0.1:8500/v1/kv/x max_body=", "invalid max_body"),
            ("127.0.0.1:8500/v1/kv/x max_body=1k", "too small"),
            ("127.0.0.1:8500/v1/kv/x max_body=99999999999g", "too large"),
            ("127.0.0.1:8500/v1/kv/x?recurse", "query string"),
            ("user:pw@127.0.0.1:8500/v1/kv/x", "credentials"),
        ];
        for (args, want) in cases {
            let e = up(args).expect_err(args);
            assert!(e.contains(want), "{args}: {e:?} does not contain {want:?}");
        }
    }

    #[test]
    fn etcd_paths() {
        let v2 =
            up("127.0.0.1:2379/v2/keys/upstreams/test/ upsync_timeout=6m upsync_interval=500ms upsync_type=etcd strong_dependency=off")
                .unwrap();
        assert_eq!(v2.source, Source::Etcd { api: EtcdApi::V2, prefix: "upstreams/test".into() });
        let v3 = up("127.0.0.1:2379,127.0.0.2:2379/v3/kv/upstreams/test upsync_type=etcd").unwrap();
        assert_eq!(v3.source, Source::Etcd { api: EtcdApi::V3, prefix: "upstreams/test".into() });
        assert_eq!(v3.addresses.len(), 2);
        let rooted = up("127.0.0.1:2379/v3/kv//upstreams/test/ upsync_type=etcd").unwrap();
        assert_eq!(rooted.source, Source::Etcd { api: EtcdApi::V3, prefix: "/upstreams/test".into() });
        let s = UpstreamSync { upsync: Some(v3), token: Some(Token::Value("t".into())), ..Default::default() };
        assert!(validate_block(&s).unwrap_err().contains("apply only to Consul"));
    }

    #[test]
    fn max_body_sizes() {
        let u = up("127.0.0.1:8500/v1/kv/x max_body=16m").unwrap();
        assert_eq!(u.max_body, 16 << 20);
        assert_eq!(up("127.0.0.1:8500/v1/kv/x max_body=4096").unwrap().max_body, MIN_MAX_BODY);
        assert_eq!(up("127.0.0.1:8500/v1/kv/x max_body=1G").unwrap().max_body, 1 << 30);
    }

    #[test]
    fn nginx_time_syntax() {
        assert_eq!(parse_time("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_time("5").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_time("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_time("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_time("").is_err());
        assert!(parse_time("s").is_err());
        assert!(parse_time("99999999999999999999999999y").is_err());
    }

    #[test]
    fn sizes_lb_tls() {
        assert_eq!(parse_size("32m").unwrap(), 32 << 20);
        assert_eq!(parse_size("512k").unwrap(), 512 << 10);
        assert!(parse_size("lots").is_err());
        assert_eq!(parse_connections("4").unwrap(), 4);
        assert!(parse_connections("1").unwrap_err().contains("from 2 to 64"));
        assert!(parse_connections("65").is_err());
        assert!(parse_connections("x").is_err());
        assert_eq!(parse_lb("least_conn").unwrap(), Lb::LeastConn);
        assert_eq!(parse_lb("hash_ketama").unwrap(), Lb::HashKetama);
        assert!(parse_lb("hash").is_err());
        assert!(check_hash_lb(Some(Lb::HashKetama), true, false).unwrap_err().contains("hash KEY consistent"));
        assert!(check_hash_lb(Some(Lb::HashModula), true, true).is_err());
        assert!(check_hash_lb(Some(Lb::HashModula), true, false).is_ok());
        assert!(check_hash_lb(None, true, true).is_ok());
        let t = parse_tls(&["ca=/etc/ca.pem", "cert=/c.pem", "key=/k.pem"]).unwrap();
        assert_eq!(t.ca_file.as_deref(), Some(std::path::Path::new("/etc/ca.pem")));
        assert!(parse_tls(&["cert=/c.pem"]).unwrap_err().contains("go together"));
        assert!(parse_tls(&["ca="]).unwrap_err().contains("needs a file path"));
    }

    #[test]
    fn token_debug_is_redacted() {
        assert_eq!(format!("{:?}", Token::Value("secret-token".into())), "Token(<redacted>)");
    }

    #[test]
    fn block_validation() {
        let s = UpstreamSync { dump_path: Some("/tmp/x".into()), ..Default::default() };
        assert!(validate_block(&s).unwrap_err().contains("need an \"upsync\" line"));
    }

    #[test]
    fn a_ring_follows_the_lists_of_consistent_hash_upstreams() {
        // Rings known at configuration time.
        assert_eq!(hash_ring(None, true, true, false), Ok(true));
        assert_eq!(hash_ring(Some(Lb::HashKetama), true, true, false), Ok(true));
        assert_eq!(hash_ring(Some(Lb::HashModula), true, false, false), Ok(false));
        assert_eq!(hash_ring(None, false, false, false), Ok(false));
        assert!(hash_ring(Some(Lb::HashKetama), true, false, false).is_err());
        assert!(hash_ring(Some(Lb::HashModula), true, true, false).is_err());
        // nginx >= 1.27.3 with `zone`: no ring yet, upsync_lb decides what is checked.
        assert_eq!(hash_ring(Some(Lb::HashKetama), true, false, true), Ok(true));
        assert_eq!(hash_ring(None, true, false, true), Ok(true));
        // (a ring a plain `hash` never reads)
        assert_eq!(hash_ring(Some(Lb::HashModula), true, false, true), Ok(true));
        assert!(hash_ring(Some(Lb::HashKetama), false, false, true).is_err());
        assert_eq!(hash_ring(None, false, false, true), Ok(false));
    }
}
