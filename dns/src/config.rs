//! Configuration: a TOML file (`--config`) and command-line flags, flags winning. Every value
//! has a default, so `upsync-dns --consul 127.0.0.1:8500 --listen 127.0.0.1:5353` is a
//! complete configuration. `dns/README.md` documents every key.
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use hickory_proto::rr::Name;
use ipnet::IpNet;
use serde::Deserialize;
use upsync_discovery::{ConsulConfig, ConsulFlags, ConsulSection};

use crate::names::parse_zone;
use crate::rrl::RrlConfig;
use crate::snapshot::{ReverseZone, ZoneConfig};

/// Command line. Flags override the config file.
#[derive(Parser, Debug, Default)]
#[command(name = "upsync-dns", version, about = "DNS server for the services registered in Consul, answering from memory")]
pub struct Cli {
    /// TOML configuration file (see dns/README.md).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Consul HTTP API address(es), tried in order: `127.0.0.1:8500`, `https://consul:8501`.
    #[arg(long, value_name = "ADDR[,ADDR...]")]
    pub consul: Option<String>,
    /// Address(es) to answer DNS on, UDP and TCP (default 127.0.0.1:53). Repeat or separate with commas.
    #[arg(long, value_name = "IP:PORT", value_delimiter = ',')]
    pub listen: Vec<SocketAddr>,
    /// The zone served (default `service.upsync.`).
    #[arg(long, value_name = "ZONE")]
    pub zone: Option<String>,
    /// Consul datacenter (`?dc=`).
    #[arg(long, value_name = "DC")]
    pub datacenter: Option<String>,
    /// Consul read consistency: default, stale or consistent.
    #[arg(long, value_name = "MODE")]
    pub consistency: Option<String>,
    /// File holding the Consul ACL token; wins over `token`/`token_file` in the config, which
    /// win over the CONSUL_HTTP_TOKEN environment variable.
    #[arg(long, visible_alias = "consul-token-file", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Upstream resolver(s) for names outside the zone (`IP[:PORT]`); none: refuse them.
    #[arg(long, value_name = "IP[:PORT],...", value_delimiter = ',', value_parser = parse_upstream)]
    pub forward: Vec<SocketAddr>,
    /// Networks whose clients may have names outside the zone resolved (default loopback).
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',')]
    pub allow_recursion: Vec<IpNet>,
    /// UDP responses per second per client prefix outside `allow_recursion` (response rate
    /// limiting; default 20, 0 turns it off).
    #[arg(long, value_name = "N")]
    pub rrl_rate: Option<u32>,
    /// Address of the HTTP endpoint serving /metrics (Prometheus) and /health.
    #[arg(long, value_name = "IP:PORT")]
    pub metrics_listen: Option<SocketAddr>,
    /// TTL of answers, in seconds (default 5).
    #[arg(long, value_name = "SECONDS")]
    pub ttl: Option<u32>,
    /// UDP sockets/threads (SO_REUSEPORT) per listen address (default: one per CPU).
    #[arg(long, value_name = "N")]
    pub udp_workers: Option<usize>,
    /// Log format: text or json.
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Check the configuration, print what would run, and exit (0: valid, 1: invalid).
    #[arg(long)]
    pub check_config: bool,
}

/// `1.1.1.1`, `1.1.1.1:53`, `[::1]:5353`, `::1`.
pub fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| format!("upstream resolver `{s}`: give IP or IP:PORT (a resolver is an address, not a name)"))
}

pub use upsync_discovery::logging::LogFormat;

// ---------------------------------------------------------------------------------------------
// The file, as written.

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FileConfig {
    consul: ConsulFile,
    dns: DnsFile,
    forward: ForwardFile,
    rrl: RrlFile,
    metrics: MetricsFile,
    log: LogFile,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RrlFile {
    responses_per_second: u32,
    slip: u32,
    #[serde(with = "upsync_discovery::duration::serde")]
    window: Duration,
    ipv4_prefix_length: u8,
    ipv6_prefix_length: u8,
    table_size: usize,
}

impl Default for RrlFile {
    fn default() -> Self {
        let d = RrlConfig::default();
        RrlFile {
            responses_per_second: d.rate,
            slip: d.slip,
            window: d.window,
            ipv4_prefix_length: d.ipv4_prefix,
            ipv6_prefix_length: d.ipv6_prefix,
            table_size: d.table_size,
        }
    }
}

/// `[consul]`: the table upsync-sidecar reads too ([`ConsulSection`], defined once in
/// discovery), plus the keys of the DNS feed's watch plan.
#[derive(Debug, Deserialize)]
#[serde(default)]
struct ConsulFile {
    #[serde(flatten)]
    common: ConsulSection,
    #[serde(with = "upsync_discovery::duration::serde")]
    wait: Duration,
    #[serde(with = "upsync_discovery::duration::serde")]
    resync_interval: Duration,
    catalog_read_budget: f64,
    hot_services: usize,
}

/// The keys of `[consul]` only upsync-dns has.
const FEED_KEYS: &[&str] = &["wait", "resync_interval", "catalog_read_budget", "hot_services"];

impl Default for ConsulFile {
    fn default() -> Self {
        ConsulFile {
            common: ConsulSection::default(),
            wait: Duration::from_secs(60),
            resync_interval: Duration::from_secs(600),
            catalog_read_budget: 0.2,
            hot_services: DEFAULT_HOT_SERVICES,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct DnsFile {
    listen: Vec<SocketAddr>,
    zone: String,
    ttl: u32,
    negative_ttl: u32,
    only_passing: bool,
    udp_workers: usize,
    max_udp_payload: u16,
    udp_answer_limit: usize,
    ns_name: Option<String>,
    ns_addresses: Vec<IpAddr>,
    hostmaster: Option<String>,
    reverse_zones: Vec<String>,
    #[serde(with = "upsync_discovery::duration::serde")]
    tcp_idle_timeout: Duration,
    max_tcp_connections: usize,
}

impl Default for DnsFile {
    fn default() -> Self {
        DnsFile {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 53))],
            zone: "service.upsync.".into(),
            ttl: 5,
            negative_ttl: 5,
            only_passing: true,
            udp_workers: 0,
            max_udp_payload: 1232,
            udp_answer_limit: 0,
            ns_name: None,
            ns_addresses: Vec::new(),
            hostmaster: None,
            reverse_zones: Vec::new(),
            tcp_idle_timeout: Duration::from_secs(10),
            max_tcp_connections: DEFAULT_MAX_TCP_CONNECTIONS,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ForwardFile {
    upstreams: Vec<String>,
    allow_recursion: Vec<IpNet>,
    cache_size: u64,
    #[serde(with = "upsync_discovery::duration::serde")]
    timeout: Duration,
}

impl Default for ForwardFile {
    fn default() -> Self {
        ForwardFile {
            upstreams: Vec::new(),
            allow_recursion: default_allow_recursion(),
            cache_size: 10_000,
            timeout: Duration::from_secs(2),
        }
    }
}

fn default_allow_recursion() -> Vec<IpNet> {
    vec![IpNet::new_assert(IpAddr::from([127, 0, 0, 0]), 8), IpNet::new_assert(IpAddr::from(std::net::Ipv6Addr::LOCALHOST), 128)]
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct MetricsFile {
    listen: Option<SocketAddr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct LogFile {
    format: LogFormat,
    /// A tracing filter (`info`, `upsync_dns=debug`); RUST_LOG wins.
    level: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// The resolved configuration.

/// How the Consul feed watches Consul (see dns/README.md, "Watch plan").
#[derive(Clone, Debug)]
pub struct FeedConfig {
    pub consul: ConsulConfig,
    /// Blocking-query wait of the change detectors.
    pub wait: Duration,
    /// A full re-read of the catalog at least this often, changes or not.
    pub resync_interval: Duration,
    /// Largest share of time spent on full catalog reads under constant churn: a read that
    /// took T is followed by a pause of T x (1/budget - 1) before the next one.
    pub catalog_read_budget: f64,
    /// Services whose instances changed most recently get a blocking query of their own, at
    /// most this many at a time (least recently changed dropped first): their next changes,
    /// even those no detector names, are seen at once.
    pub hot_services: usize,
}

/// Default of `[consul] request_timeout` for upsync-dns: a full read of a large catalog takes
/// seconds.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Default of `[consul] hot_services`.
pub const DEFAULT_HOT_SERVICES: usize = 32;
/// Consul refuses more than 200 connections from one client address by default
/// (`limits.http_max_conns_per_client`): the hot watches (twice this while given-up ones
/// finish their last request), the detectors and the reads stay under it.
pub const MAX_HOT_SERVICES: usize = 64;

/// Default of `[dns] max_tcp_connections`.
pub const DEFAULT_MAX_TCP_CONNECTIONS: usize = 256;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: Vec<SocketAddr>,
    pub udp_workers: usize,
    pub max_udp_payload: u16,
    pub udp_answer_limit: usize,
    /// A TCP connection without a complete query for this long is closed.
    pub tcp_idle_timeout: Duration,
    /// Open DNS-over-TCP connections at most (all listen addresses together); at the bound
    /// the connection idle the longest is closed for a new one.
    pub max_tcp_connections: usize,
    /// Response rate limiting of UDP answers; `exempt` is `[forward] allow_recursion`.
    pub rrl: RrlConfig,
}

#[derive(Clone, Debug)]
pub struct ForwardConfig {
    /// Empty: forwarding off, names outside the zones are REFUSED.
    pub upstreams: Vec<SocketAddr>,
    pub allow_recursion: Vec<IpNet>,
    pub cache_size: u64,
    pub timeout: Duration,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub feed: FeedConfig,
    pub zone: ZoneConfig,
    pub server: ServerConfig,
    pub forward: ForwardConfig,
    pub metrics_listen: Option<SocketAddr>,
    pub log_format: LogFormat,
    pub log_level: Option<String>,
    /// Former spellings the file still uses, each naming the key to write instead.
    pub deprecations: Vec<String>,
}

impl Config {
    /// The file named by `--config` (if any) with `cli` applied over it. `env_token` is the
    /// CONSUL_HTTP_TOKEN environment variable, used when neither the file nor the flags name
    /// a token.
    pub fn load(cli: &Cli, env_token: Option<String>) -> anyhow::Result<Config> {
        let file = match &cli.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        Config::resolve(file, cli, env_token).with_context(|| match &cli.config {
            Some(p) => format!("invalid configuration (file {} and command line)", p.display()),
            None => "invalid command line".to_string(),
        })
    }

    fn resolve(f: FileConfig, cli: &Cli, env_token: Option<String>) -> anyhow::Result<Config> {
        // Consul: the shared [consul] table, with this program's flags and defaults.
        let flags = ConsulFlags {
            addresses: cli.consul.clone(),
            token_file: cli.token_file.clone(),
            datacenter: cli.datacenter.clone(),
            consistency: cli.consistency.clone(),
        };
        let defaults = ConsulConfig { request_timeout: DEFAULT_REQUEST_TIMEOUT, ..ConsulConfig::default() };
        let consul = f.consul.common.resolve(defaults, &flags, env_token, FEED_KEYS)?;
        let deprecations = f.consul.common.deprecations();
        if f.consul.wait < Duration::from_secs(1) || f.consul.wait > Duration::from_secs(600) {
            bail!("[consul] wait = {:?}: use 1s to 10m (Consul's maximum)", f.consul.wait);
        }
        if f.consul.resync_interval < Duration::from_secs(1) {
            bail!("[consul] resync_interval = {:?}: use at least 1s", f.consul.resync_interval);
        }
        if f.consul.hot_services > MAX_HOT_SERVICES {
            bail!(
                "[consul] hot_services = {}: at most {MAX_HOT_SERVICES} (each holds a connection to Consul, which accepts 200 per client address by default)",
                f.consul.hot_services
            );
        }
        if !(f.consul.catalog_read_budget > 0.0 && f.consul.catalog_read_budget <= 1.0) {
            bail!("[consul] catalog_read_budget = {}: a share of time above 0, at most 1 (default 0.2)", f.consul.catalog_read_budget);
        }

        // Zone.
        let d = f.dns;
        let zone_name = parse_zone(cli.zone.as_deref().unwrap_or(&d.zone)).map_err(anyhow::Error::msg)?;
        let mut zone = ZoneConfig::new(zone_name.clone());
        zone.ttl = cli.ttl.unwrap_or(d.ttl);
        zone.negative_ttl = d.negative_ttl;
        zone.only_passing = d.only_passing;
        if let Some(ns) = &d.ns_name {
            zone.ns_name = parse_zone(ns).map_err(|e| anyhow::anyhow!("[dns] ns_name: {e}"))?;
        }
        if let Some(hm) = &d.hostmaster {
            zone.hostmaster = parse_zone(hm).map_err(|e| anyhow::anyhow!("[dns] hostmaster: {e}"))?;
        }
        let listen = if cli.listen.is_empty() { d.listen } else { cli.listen.clone() };
        if listen.is_empty() {
            bail!("no listen address: give --listen IP:PORT");
        }
        zone.ns_addrs = if d.ns_addresses.is_empty() {
            listen.iter().map(|a| a.ip()).filter(|ip| !ip.is_unspecified()).collect()
        } else {
            d.ns_addresses
        };
        zone.ns_addrs.sort();
        zone.ns_addrs.dedup();
        zone.reverse_zones = d.reverse_zones.iter().map(|z| reverse_zone(z)).collect::<anyhow::Result<_>>()?;
        if zone.ttl > 86400 || zone.negative_ttl > 86400 {
            bail!("[dns] ttl and negative_ttl are seconds, at most 86400");
        }

        let server = ServerConfig {
            listen,
            udp_workers: match cli.udp_workers.unwrap_or(d.udp_workers) {
                0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
                n => n,
            },
            max_udp_payload: d.max_udp_payload,
            udp_answer_limit: d.udp_answer_limit,
            tcp_idle_timeout: d.tcp_idle_timeout,
            max_tcp_connections: d.max_tcp_connections,
            rrl: RrlConfig {
                rate: cli.rrl_rate.unwrap_or(f.rrl.responses_per_second),
                slip: f.rrl.slip,
                window: f.rrl.window,
                ipv4_prefix: f.rrl.ipv4_prefix_length,
                ipv6_prefix: f.rrl.ipv6_prefix_length,
                table_size: f.rrl.table_size,
                exempt: Vec::new(),
            },
        };
        if server.tcp_idle_timeout.is_zero() {
            bail!("[dns] tcp_idle_timeout must be above zero (default 10s)");
        }
        if server.max_tcp_connections == 0 {
            bail!("[dns] max_tcp_connections must be at least 1 (default {DEFAULT_MAX_TCP_CONNECTIONS})");
        }
        let r = &server.rrl;
        if r.ipv4_prefix > 32 || r.ipv6_prefix > 128 {
            bail!("[rrl] ipv4_prefix_length (0 to 32) or ipv6_prefix_length (0 to 128) out of range");
        }
        if r.window < Duration::from_secs(1) || r.window > Duration::from_secs(3600) {
            bail!("[rrl] window = {:?}: use 1s to 1h (default 15s)", r.window);
        }
        if !(4..=16_777_216).contains(&r.table_size) {
            bail!("[rrl] table_size = {}: use 4 to 16777216 prefixes (default 65536)", r.table_size);
        }
        if !(512..=4096).contains(&server.max_udp_payload) {
            bail!("[dns] max_udp_payload = {}: use 512 to 4096 (1232 avoids IP fragmentation)", server.max_udp_payload);
        }
        if server.udp_workers > 64 {
            bail!("udp_workers = {}: at most 64", server.udp_workers);
        }

        let upstreams = if cli.forward.is_empty() {
            f.forward.upstreams.iter().map(|u| parse_upstream(u).map_err(anyhow::Error::msg)).collect::<anyhow::Result<Vec<_>>>()?
        } else {
            cli.forward.clone()
        };
        for u in &upstreams {
            if server.listen.contains(u) {
                bail!("forwarding to {u}, which is this server's own listen address: that would loop");
            }
        }
        let forward = ForwardConfig {
            upstreams,
            allow_recursion: if cli.allow_recursion.is_empty() { f.forward.allow_recursion } else { cli.allow_recursion.clone() },
            cache_size: f.forward.cache_size,
            timeout: f.forward.timeout,
        };
        if forward.timeout.is_zero() {
            bail!("[forward] timeout must be above zero");
        }
        let mut server = server;
        server.rrl.exempt = forward.allow_recursion.clone();

        Ok(Config {
            feed: FeedConfig {
                consul,
                wait: f.consul.wait,
                resync_interval: f.consul.resync_interval,
                catalog_read_budget: f.consul.catalog_read_budget,
                hot_services: f.consul.hot_services,
            },
            zone,
            server,
            forward,
            metrics_listen: cli.metrics_listen.or(f.metrics.listen),
            log_format: cli.log_format.unwrap_or(f.log.format),
            log_level: f.log.level,
            deprecations,
        })
    }

    /// Settings that work but expose the server, and former spellings of keys: logged as
    /// warnings at start.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = self.deprecations.clone();
        for net in self.forward.allow_recursion.iter().filter(|n| n.prefix_len() == 0) {
            w.push(format!(
                "allow_recursion includes {net}: every client may use this server as an open resolver{} and is exempt from response rate limiting (an amplifier for spoofed traffic); list only your own networks",
                if self.forward.upstreams.is_empty() { " once forwarding is on" } else { "" }
            ));
        }
        w
    }

    /// What `--check-config` prints: the effective settings, without secrets.
    pub fn summary(&self) -> String {
        let consul: Vec<String> = self.feed.consul.addresses.iter().map(|a| a.to_string()).collect();
        let token = match (&self.feed.consul.token, &self.feed.consul.token_file) {
            (Some(_), _) => "set".to_string(),
            (None, Some(p)) => format!("from {}", p.display()),
            (None, None) => "none".to_string(),
        };
        let listen: Vec<String> = self.server.listen.iter().map(|a| a.to_string()).collect();
        let fwd = if self.forward.upstreams.is_empty() {
            "off (names outside the zone are REFUSED)".to_string()
        } else {
            let up: Vec<String> = self.forward.upstreams.iter().map(|a| a.to_string()).collect();
            let allow: Vec<String> = self.forward.allow_recursion.iter().map(|n| n.to_string()).collect();
            format!("to {} for clients in {}", up.join(", "), allow.join(", "))
        };
        let r = &self.server.rrl;
        let rrl = if r.rate == 0 {
            "off".to_string()
        } else {
            let exempt: Vec<String> = r.exempt.iter().map(|n| n.to_string()).collect();
            format!(
                "{}/s per /{} and /{} over UDP, slip {}, window {:?}, exempt {}",
                r.rate,
                r.ipv4_prefix,
                r.ipv6_prefix,
                r.slip,
                r.window,
                if exempt.is_empty() { "none".to_string() } else { exempt.join(", ") }
            )
        };
        format!(
            "configuration OK\n  consul: {} (token: {token}, datacenter: {}, consistency: {:?})\n  zone: {} (ttl {}s, negative ttl {}s, NS {})\n  listen: {} (UDP workers per address: {})\n  forwarding: {fwd}\n  rate limiting: {rrl}\n  TCP: at most {} connections, idle timeout {:?}\n  metrics: {}",
            consul.join(", "),
            self.feed.consul.datacenter.as_deref().unwrap_or("agent's"),
            self.feed.consul.consistency,
            self.zone.zone,
            self.zone.ttl,
            self.zone.negative_ttl,
            self.zone.ns_name,
            listen.join(", "),
            self.server.udp_workers,
            self.server.max_tcp_connections,
            self.server.tcp_idle_timeout,
            self.metrics_listen.map_or("off".to_string(), |a| format!("http://{a}/metrics")),
        )
    }
}

fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("config file {}", path.display()))
}

/// `10.in-addr.arpa.` or a CIDR (`10.0.0.0/8`, octet/nibble aligned).
fn reverse_zone(s: &str) -> anyhow::Result<ReverseZone> {
    let bad = |why: &str| anyhow::anyhow!("[dns] reverse_zones: `{s}`: {why}");
    if let Ok(net) = s.parse::<IpNet>() {
        let step = if net.addr().is_ipv4() { 8 } else { 4 };
        if net.prefix_len() % step != 0 || net.prefix_len() == 0 {
            return Err(bad(&format!("the prefix length must be a non-zero multiple of {step}")));
        }
        let name = match net.trunc() {
            IpNet::V4(n) => {
                let o = n.addr().octets();
                let mut labels: Vec<String> = o[..(n.prefix_len() / 8) as usize].iter().rev().map(|b| b.to_string()).collect();
                labels.extend(["in-addr".into(), "arpa".into()]);
                labels.join(".") + "."
            }
            IpNet::V6(n) => {
                let hex = format!("{:032x}", u128::from(n.addr()));
                let mut labels: Vec<String> = hex[..(n.prefix_len() / 4) as usize].chars().rev().map(String::from).collect();
                labels.extend(["ip6".into(), "arpa".into()]);
                labels.join(".") + "."
            }
        };
        let name = Name::from_ascii(&name).map_err(|e| bad(&e.to_string()))?;
        return Ok(ReverseZone { name, net: net.trunc() });
    }
    let name = parse_zone(s).map_err(|e| bad(&e))?;
    let net = name.parse_arpa_name().map_err(|_| bad("not a reverse zone (in-addr.arpa. or ip6.arpa.) nor a CIDR"))?;
    Ok(ReverseZone { name, net })
}

#[cfg(test)]
mod tests {
    use upsync_discovery::Consistency;

    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("upsync-dns").chain(args.iter().copied())).unwrap()
    }

    fn from_toml(toml_text: &str, args: &[&str]) -> anyhow::Result<Config> {
        let f: FileConfig = toml::from_str(toml_text)?;
        Config::resolve(f, &cli(args), None)
    }

    #[test]
    fn defaults() {
        let c = from_toml("", &[]).unwrap();
        assert_eq!(c.zone.zone.to_ascii(), "service.upsync.");
        assert_eq!(c.server.listen, ["127.0.0.1:53".parse().unwrap()]);
        assert_eq!(c.feed.consul.addresses[0].to_string(), "http://127.0.0.1:8500");
        assert_eq!((c.zone.ttl, c.zone.negative_ttl), (5, 5));
        assert!(c.forward.upstreams.is_empty());
        assert_eq!(c.forward.allow_recursion, ["127.0.0.0/8".parse::<IpNet>().unwrap(), "::1/128".parse().unwrap()]);
        assert_eq!(c.zone.ns_addrs, ["127.0.0.1".parse::<IpAddr>().unwrap()]);
        assert!(c.server.udp_workers >= 1);
    }

    #[test]
    fn rate_limiting_tcp_bounds_and_open_recursion() {
        let c = from_toml("", &[]).unwrap();
        assert_eq!((c.server.rrl.rate, c.server.rrl.slip, c.server.max_tcp_connections), (20, 2, 256));
        assert_eq!(c.server.rrl.exempt, c.forward.allow_recursion, "allow_recursion is exempt");
        assert!(c.warnings().is_empty());
        let c = from_toml(
            "[rrl]\nresponses_per_second = 5\nslip = 1\nwindow = \"3s\"\nipv4_prefix_length = 32\n[dns]\nmax_tcp_connections = 10\n",
            &["--allow-recursion", "10.0.0.0/8"],
        )
        .unwrap();
        assert_eq!((c.server.rrl.rate, c.server.rrl.slip, c.server.rrl.ipv4_prefix, c.server.max_tcp_connections), (5, 1, 32, 10));
        assert_eq!(c.server.rrl.window, Duration::from_secs(3));
        assert_eq!(c.server.rrl.exempt, ["10.0.0.0/8".parse::<IpNet>().unwrap()]);
        assert_eq!(from_toml("", &["--rrl-rate", "0"]).unwrap().server.rrl.rate, 0);
        for bad in ["[rrl]\nipv4_prefix_length = 33", "[rrl]\nwindow = \"0s\"", "[dns]\nmax_tcp_connections = 0", "[rrl]\nrate = 1"] {
            assert!(from_toml(bad, &[]).is_err(), "{bad}");
        }
        let open = from_toml("", &["--allow-recursion", "0.0.0.0/0,::/0"]).unwrap();
        let w = open.warnings();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("0.0.0.0/0") && w[1].contains("::/0"), "{w:?}");
    }

    #[test]
    fn flags_as_named_in_the_issue() {
        let c = from_toml("", &["--consul", "127.0.0.1:1,127.0.0.1:2", "--listen", "127.0.0.1:5353", "--zone", "Apps.Example"]).unwrap();
        assert_eq!(c.feed.consul.addresses.len(), 2);
        assert_eq!(c.server.listen, ["127.0.0.1:5353".parse().unwrap()]);
        assert_eq!(c.zone.zone.to_ascii(), "apps.example.");
        assert_eq!(c.zone.ns_name.to_ascii(), "ns.apps.example.");
    }

    #[test]
    fn flags_override_the_file() {
        let toml_text = r#"
            [consul]
            addresses = ["10.0.0.1:8500"]
            datacenter = "dc2"
            consistency = "stale"
            wait = "30s"
            [dns]
            listen = ["127.0.0.1:8600"]
            zone = "consul.internal"
            ttl = 30
            reverse_zones = ["10.0.0.0/8", "1.168.192.in-addr.arpa"]
            [forward]
            upstreams = ["127.0.0.1:5300", "::1"]
            allow_recursion = ["10.0.0.0/8"]
            [metrics]
            listen = "127.0.0.1:9153"
            [log]
            format = "json"
        "#;
        let c = from_toml(toml_text, &["--ttl", "7", "--consul", "127.0.0.1:8501"]).unwrap();
        assert_eq!(c.zone.ttl, 7);
        assert_eq!(c.feed.consul.addresses[0].to_string(), "http://127.0.0.1:8501");
        assert_eq!(c.feed.consul.datacenter.as_deref(), Some("dc2"));
        assert_eq!(c.feed.consul.consistency, Consistency::Stale);
        assert_eq!(c.feed.wait, Duration::from_secs(30));
        assert_eq!(c.forward.upstreams, ["127.0.0.1:5300".parse().unwrap(), "[::1]:53".parse().unwrap()]);
        assert_eq!(c.zone.reverse_zones[0].name.to_ascii(), "10.in-addr.arpa.");
        assert_eq!(c.zone.reverse_zones[1].net, "192.168.1.0/24".parse::<IpNet>().unwrap());
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9153".parse().unwrap()));
        assert_eq!(c.log_format, LogFormat::Json);
    }

    #[test]
    fn mistakes_are_named() {
        let err = |t: &str, a: &[&str]| format!("{:#}", from_toml(t, a).unwrap_err());
        assert!(err("[dns]\nzon = \"x\"", &[]).contains("unknown field `zon`"));
        assert!(err("", &["--zone", "."]).contains("root zone"));
        assert!(err("", &["--consul", "ftp://x"]).contains("ftp://x"));
        assert!(err("[consul]\nconsistency = \"eventual\"", &[]).contains("eventual"));
        assert!(err("[consul]\ntoken = \"a\"\ntoken_file = \"/b\"", &[]).contains("token and token_file are both set: keep one"));
        assert!(err("[consul]\nwiat = \"5s\"", &[]).contains("unknown key `wiat`: the keys are addresses, catalog_read_budget,"));
        assert!(err("[consul]\nrequest_timeout = \"soon\"", &[]).contains("[consul] request_timeout: `soon` is not a duration"));
        assert!(err("[forward]\nupstreams = [\"dns.google\"]", &[]).contains("not a name"));
        assert!(err("[dns]\nreverse_zones = [\"10.0.0.0/12\"]", &[]).contains("multiple of 8"));
        assert!(err("[dns]\nreverse_zones = [\"example.com\"]", &[]).contains("not a reverse zone"));
        assert!(err("[consul]\ncatalog_read_budget = 0.0", &[]).contains("catalog_read_budget"));
        assert!(err("[consul]\nhot_services = 500", &[]).contains("hot_services = 500: at most 64"));
        assert!(err("", &["--listen", "127.0.0.1:5353", "--forward", "127.0.0.1:5353"]).contains("loop"));
        assert!(err("[consul]\ntoken_file = \"/nonexistent/token\"", &[]).contains("/nonexistent/token"));
    }

    #[test]
    fn token_from_environment_only_as_a_last_resort() {
        let f: FileConfig = toml::from_str("").unwrap();
        let c = Config::resolve(f, &cli(&[]), Some("env-secret".into())).unwrap();
        assert_eq!(c.feed.consul.token.as_ref().map(|t| t.expose()), Some("env-secret"));
        assert!(!c.summary().contains("env-secret"));
        assert!(!format!("{c:?}").contains("env-secret"));
        let f: FileConfig = toml::from_str("[consul]\ntoken = \"file-secret\"").unwrap();
        let c = Config::resolve(f, &cli(&[]), Some("env-secret".into())).unwrap();
        assert_eq!(c.feed.consul.token.as_ref().map(|t| t.expose()), Some("file-secret"));
    }

    #[test]
    fn the_consul_table_is_the_shared_one_with_its_former_spellings() {
        let new = from_toml("[consul]\ntls = { ca_file = \"/ca.pem\", cert_file = \"/c.pem\", key_file = \"/k.pem\" }\nwait = \"5s\"", &[])
            .unwrap();
        let old = from_toml("[consul]\nca_file = \"/ca.pem\"\ncert_file = \"/c.pem\"\nkey_file = \"/k.pem\"\nwait = \"5s\"", &[]).unwrap();
        assert_eq!(old.feed.consul, new.feed.consul);
        assert_eq!((old.feed.wait, new.feed.wait), (Duration::from_secs(5), Duration::from_secs(5)));
        assert!(new.warnings().is_empty(), "{:?}", new.warnings());
        let w = old.warnings();
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(w.iter().all(|w| w.contains("is deprecated")) && w[0].contains("tls.ca_file"), "{w:?}");
        assert_eq!(new.feed.consul.request_timeout, DEFAULT_REQUEST_TIMEOUT);
        assert_eq!(from_toml("[consul]\nrequest_timeout = 7", &[]).unwrap().feed.consul.request_timeout, Duration::from_secs(7));
    }

    #[test]
    fn the_packaged_configuration_is_valid() {
        let c = from_toml(include_str!("../../packaging/upsync-dns/dns.toml"), &[]).unwrap();
        assert!(c.warnings().is_empty(), "{:?}", c.warnings());
        assert_eq!(c.feed.consul.addresses[0].to_string(), "http://127.0.0.1:8500");
    }
}
