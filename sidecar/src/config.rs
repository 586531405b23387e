//! Command line and TOML configuration file, merged into one validated [`Settings`].
//!
//! Precedence: command line, then the file given with `--config`, then the defaults. Every
//! setting of the command line can also be set in the file; a few (TLS, check defaults) only
//! in the file. Unknown keys in the file are an error naming the key, so a typo is not
//! silently ignored.
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

use upsync_discovery::config::split_list;
use upsync_discovery::{ConsulConfig, ConsulFlags, ConsulSection, Secret};

use crate::model::{validate_kv_prefix, validate_node_id, validate_tag, Defaults};

/// Default address of the scheduler API.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8515";

#[derive(Parser, Debug, Default)]
#[command(
    name = "upsync-sidecar",
    version,
    about = "Registers containers and scheduler endpoints in Consul, drains them before deregistering",
    long_about = "Registers the containers of this host (Docker Engine API on a unix socket: Docker or \
                  podman) and the endpoints a scheduler PUTs on its HTTP API in Consul: as agent \
                  services with checks and as upsync KV entries PREFIX/SERVICE/IP:PORT that the nginx \
                  module reads. Drains endpoints before removing them and reconciles Consul with \
                  reality at start and on every resync interval. See sidecar/README.md."
)]
pub struct Args {
    /// Consul HTTP addresses, comma-separated (`127.0.0.1:8500`, `http://h:p`, `https://h:p`); the
    /// next one is tried when one fails.
    #[arg(long, value_name = "ADDR[,ADDR...]")]
    pub consul: Option<String>,
    /// Docker Engine API unix socket (Docker's or `podman system service`'s).
    #[arg(long, value_name = "PATH")]
    pub docker_socket: Option<PathBuf>,
    /// Address of the scheduler HTTP API [default: 127.0.0.1:8515].
    #[arg(long, value_name = "IP:PORT")]
    pub listen: Option<SocketAddr>,
    /// KV prefix of the upsync entries: PREFIX/SERVICE/IP:PORT [default: upstreams].
    #[arg(long, value_name = "PREFIX")]
    pub kv_prefix: Option<String>,
    /// Host address registered for published ports. Default: the source address of the
    /// default route (never a loopback address unless given here).
    #[arg(long, value_name = "IP")]
    pub advertise_ip: Option<IpAddr>,
    /// TOML configuration file (see sidecar/README.md); command-line options win over it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// This sidecar's node id: tags and owns what it registers [default: the host name].
    #[arg(long, value_name = "ID")]
    pub node_id: Option<String>,
    /// Register containers' own addresses and exposed ports instead of published host ports
    /// (host, macvlan, overlay networks).
    #[arg(long)]
    pub internal: bool,
    /// File holding the Consul ACL token (also: `consul.token` in the file, CONSUL_HTTP_TOKEN).
    #[arg(long, value_name = "FILE")]
    pub consul_token_file: Option<PathBuf>,
    /// File holding the bearer token the scheduler API requires (also: `api.token` in the file).
    #[arg(long, value_name = "FILE")]
    pub api_token_file: Option<PathBuf>,
    /// How long an endpoint is kept marked down before it is deregistered [default: 5s]; for
    /// containers, never longer than the container's stop timeout.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub drain: Option<Duration>,
    /// Reconcile Consul with the containers and the API's endpoints this often [default: 30s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub resync: Option<Duration>,
    /// Re-list running containers this often to notice stops the event stream does not report
    /// (podman sends no event when a stop begins) [default: 1s; 0 turns it off].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub poll: Option<Duration>,
    /// A container port is registered once it accepts TCP connections, waiting at most this
    /// long (then it is registered anyway, with a warning) [default: 30s; 0 turns it off].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub ready_timeout: Option<Duration>,
    /// Only containers with this label (`KEY` or `KEY=VALUE`, the engine's own `label` filter)
    /// [default: every container]. For several sidecars or test runs sharing one engine.
    #[arg(long, value_name = "KEY[=VALUE]")]
    pub container_label: Option<String>,
    /// No container engine: only the scheduler API's endpoints (a host that runs no
    /// containers).
    #[arg(long)]
    pub no_engine: bool,
    /// Do not write upsync KV entries.
    #[arg(long)]
    pub no_kv: bool,
    /// Do not register Consul agent services.
    #[arg(long)]
    pub no_services: bool,
    /// Tags added to every service registered, comma-separated.
    #[arg(long, value_name = "TAG[,TAG...]")]
    pub tags: Option<String>,
    /// Log format: text or json [default: text]. The level comes from RUST_LOG (default info).
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Accept API endpoints in this network although it is loopback, link-local or a cloud
    /// metadata address (refused by default); repeatable (also: `api.allow_addresses`).
    #[arg(long = "allow-address", value_name = "CIDR")]
    pub allow_address: Vec<String>,
    /// Start although the API listens beyond loopback without a bearer token (refused by
    /// default: anyone who reaches it could register endpoints).
    #[arg(long)]
    pub insecure_no_token: bool,
    /// Directory where accepted API calls are recorded (fsync'd) until Consul holds them
    /// [default: /var/lib/upsync-sidecar].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

pub use upsync_discovery::logging::LogFormat;

/// The configuration file. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub node_id: Option<String>,
    pub advertise_ip: Option<IpAddr>,
    pub internal: Option<bool>,
    pub log_format: Option<LogFormat>,
    /// The `[consul]` table shared with upsync-dns (defined once in discovery).
    #[serde(default)]
    pub consul: ConsulSection,
    #[serde(default)]
    pub engine: FileEngine,
    #[serde(default)]
    pub api: FileApi,
    #[serde(default)]
    pub kv: FileKv,
    #[serde(default)]
    pub services: FileServices,
    #[serde(default)]
    pub drain: FileDrain,
    #[serde(default)]
    pub defaults: FileDefaults,
    pub resync: Option<String>,
    pub state_prefix: Option<String>,
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEngine {
    pub enabled: Option<bool>,
    pub socket: Option<PathBuf>,
    pub poll: Option<String>,
    pub ready_timeout: Option<String>,
    pub container_label: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileApi {
    pub listen: Option<SocketAddr>,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub allow_addresses: Option<Vec<String>>,
    pub insecure_no_token: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileKv {
    pub enabled: Option<bool>,
    pub prefix: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileServices {
    pub enabled: Option<bool>,
    pub tags: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDrain {
    pub period: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDefaults {
    pub weight: Option<u32>,
    pub max_fails: Option<u32>,
    pub fail_timeout: Option<u32>,
    pub check_interval: Option<String>,
    pub check_timeout: Option<String>,
}

/// Everything the sidecar runs with, validated.
#[derive(Clone, Debug)]
pub struct Settings {
    pub node_id: String,
    pub advertise_ip: IpAddr,
    pub internal: bool,
    pub consul: ConsulConfig,
    pub docker_socket: PathBuf,
    pub engine_enabled: bool,
    pub listen: SocketAddr,
    pub api_token: Option<Secret>,
    pub kv_enabled: bool,
    pub kv_prefix: String,
    pub services_enabled: bool,
    pub tags: Vec<String>,
    pub drain: Duration,
    pub resync: Duration,
    pub poll: Duration,
    pub ready_timeout: Duration,
    /// Only containers with this label (`KEY` or `KEY=VALUE`).
    pub container_label: Option<String>,
    pub state_prefix: String,
    pub defaults: Defaults,
    pub log_format: LogFormat,
    /// Networks whose addresses the API accepts although they are loopback, link-local or a
    /// cloud metadata address.
    pub allow_addresses: Vec<ipnet::IpNet>,
    /// Where accepted API calls are recorded until Consul holds them.
    pub state_dir: PathBuf,
    /// Former spellings the file still uses, each naming the key to write instead (logged at
    /// start).
    pub deprecations: Vec<String>,
}

/// Default of `--state-dir`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/upsync-sidecar";

fn parse_cidr(s: &str) -> Result<ipnet::IpNet, String> {
    let s = s.trim();
    if let Ok(n) = s.parse::<ipnet::IpNet>() {
        return Ok(n.trunc());
    }
    s.parse::<IpAddr>().map(ipnet::IpNet::from).map_err(|_| format!("`{s}` is not an address or a network (10.0.0.0/8, ::1/128)"))
}

use upsync_discovery::duration::parse as parse_duration;

fn duration_key(key: &str, value: Option<&str>, default: Duration) -> anyhow::Result<Duration> {
    match value {
        None => Ok(default),
        Some(v) => parse_duration(v).map_err(|e| anyhow::anyhow!("{key}: {e}")),
    }
}

fn read_secret_file(path: &Path, what: &str) -> anyhow::Result<Secret> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading the {what} from {}: {e}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        anyhow::bail!("the {what} file {} is empty", path.display());
    }
    Ok(Secret::new(token))
}

impl FileConfig {
    pub fn load(path: &Path) -> anyhow::Result<FileConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading the configuration file {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("configuration file {}: {e}", path.display()))
    }
}

impl Settings {
    /// Merges the command line with the file it names (if any) and the defaults.
    pub fn from_args(args: Args) -> anyhow::Result<Settings> {
        let file = match &args.config {
            Some(p) => FileConfig::load(p)?,
            None => FileConfig::default(),
        };
        Settings::merge(args, file, std::env::var("CONSUL_HTTP_TOKEN").ok())
    }

    /// The merge itself, without touching the environment (testable).
    pub fn merge(args: Args, file: FileConfig, env_token: Option<String>) -> anyhow::Result<Settings> {
        // The client re-reads a token file whenever it changes (rotation).
        let flags = ConsulFlags { addresses: args.consul.clone(), token_file: args.consul_token_file.clone(), ..ConsulFlags::default() };
        let consul = file.consul.resolve(ConsulConfig::default(), &flags, env_token, &[])?;
        let deprecations = file.consul.deprecations();
        let api_token = if let Some(p) = args.api_token_file.as_ref().or(file.api.token_file.as_ref()) {
            Some(read_secret_file(p, "API bearer token")?)
        } else {
            file.api.token.clone().filter(|t| !t.trim().is_empty()).map(Secret::new)
        };

        let node_id = match args.node_id.or(file.node_id) {
            Some(n) => n,
            None => gethostname::gethostname().into_string().map_err(|_| anyhow::anyhow!("the host name is not UTF-8; set --node-id"))?,
        };
        validate_node_id(&node_id).map_err(|e| anyhow::anyhow!("--node-id `{node_id}`: {e}"))?;

        let advertise_ip = match args.advertise_ip.or(file.advertise_ip) {
            Some(ip) => {
                if ip.is_unspecified() || ip.is_multicast() {
                    anyhow::bail!("--advertise-ip {ip}: not an address other hosts can reach; give this host's address");
                }
                ip
            }
            None => default_route_ip()?,
        };

        let kv_prefix = args.kv_prefix.or(file.kv.prefix).unwrap_or_else(|| "upstreams".to_string());
        let kv_prefix = kv_prefix.trim_matches('/').to_string();
        validate_kv_prefix(&kv_prefix).map_err(|e| anyhow::anyhow!("--kv-prefix `{kv_prefix}`: {e}"))?;
        let state_prefix = file.state_prefix.unwrap_or_else(|| "upsync-sidecar".to_string());
        let state_prefix = state_prefix.trim_matches('/').to_string();
        validate_kv_prefix(&state_prefix).map_err(|e| anyhow::anyhow!("state_prefix `{state_prefix}`: {e}"))?;
        if state_prefix == kv_prefix || state_prefix.starts_with(&format!("{kv_prefix}/")) {
            anyhow::bail!("state_prefix `{state_prefix}` must not be inside the KV prefix `{kv_prefix}` (nginx would read it)");
        }

        let mut tags = match args.tags {
            Some(t) => split_list(&t).map(str::to_string).collect(),
            None => file.services.tags.clone().unwrap_or_default(),
        };
        tags.dedup();
        for t in &tags {
            validate_tag(t).map_err(|e| anyhow::anyhow!("--tags `{t}`: {e}"))?;
        }

        let kv_enabled = !args.no_kv && file.kv.enabled.unwrap_or(true);
        let services_enabled = !args.no_services && file.services.enabled.unwrap_or(true);
        if !kv_enabled && !services_enabled {
            anyhow::bail!("both outputs are off (--no-kv and --no-services): nothing would be registered");
        }

        let mut defaults = Defaults::default();
        if let Some(w) = file.defaults.weight {
            defaults.weight = w;
        }
        if let Some(m) = file.defaults.max_fails {
            defaults.max_fails = m;
        }
        if let Some(t) = file.defaults.fail_timeout {
            defaults.fail_timeout = t;
        }
        defaults.check_interval =
            duration_key("defaults.check_interval", file.defaults.check_interval.as_deref(), defaults.check_interval)?;
        defaults.check_timeout = duration_key("defaults.check_timeout", file.defaults.check_timeout.as_deref(), defaults.check_timeout)?;
        defaults.validate().map_err(|e| anyhow::anyhow!("[defaults] {e}"))?;

        let drain = match args.drain {
            Some(d) => d,
            None => duration_key("drain.period", file.drain.period.as_deref(), Duration::from_secs(5))?,
        };
        let resync = match args.resync {
            Some(d) => d,
            None => duration_key("resync", file.resync.as_deref(), Duration::from_secs(30))?,
        };
        if resync < Duration::from_millis(100) {
            anyhow::bail!("--resync {resync:?}: too short (at least 100ms)");
        }
        let poll = match args.poll {
            Some(d) => d,
            None => duration_key("engine.poll", file.engine.poll.as_deref(), Duration::from_secs(1))?,
        };
        let ready_timeout = match args.ready_timeout {
            Some(d) => d,
            None => duration_key("engine.ready_timeout", file.engine.ready_timeout.as_deref(), Duration::from_secs(30))?,
        };
        let container_label = args.container_label.or(file.engine.container_label).filter(|l| !l.is_empty());
        if let Some(l) = &container_label {
            if l.starts_with('=') || l.chars().any(char::is_whitespace) {
                anyhow::bail!("--container-label {l:?}: give KEY or KEY=VALUE (no spaces)");
            }
        }
        let listen = args.listen.or(file.api.listen).unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default"));
        let insecure_no_token = args.insecure_no_token || file.api.insecure_no_token.unwrap_or(false);
        if !listen.ip().is_loopback() && api_token.is_none() && !insecure_no_token {
            anyhow::bail!(
                "--listen {listen}: the API would listen beyond loopback without a bearer token, so anyone who reaches it could \
                 register and delete endpoints; give --api-token-file (or api.token), listen on 127.0.0.1, or say --insecure-no-token"
            );
        }
        let mut allow_addresses = Vec::new();
        let from_file = file.api.allow_addresses.clone().unwrap_or_default();
        for (opt, a) in
            args.allow_address.iter().map(|a| ("--allow-address", a)).chain(from_file.iter().map(|a| ("api.allow_addresses", a)))
        {
            allow_addresses.push(parse_cidr(a).map_err(|e| anyhow::anyhow!("{opt}: {e}"))?);
        }
        let state_dir = args.state_dir.or(file.state_dir).unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));

        Ok(Settings {
            node_id,
            advertise_ip,
            internal: args.internal || file.internal.unwrap_or(false),
            consul,
            docker_socket: args.docker_socket.or(file.engine.socket).unwrap_or_else(|| PathBuf::from("/var/run/docker.sock")),
            engine_enabled: !args.no_engine && file.engine.enabled.unwrap_or(true),
            listen,
            api_token,
            kv_enabled,
            kv_prefix,
            services_enabled,
            tags,
            drain,
            resync,
            poll,
            ready_timeout,
            container_label,
            state_prefix,
            defaults,
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
            allow_addresses,
            state_dir,
            deprecations,
        })
    }

    /// KV folder holding this node's ownership records.
    pub fn records_prefix(&self) -> String {
        format!("{}/{}/endpoints/", self.state_prefix, self.node_id)
    }
}

/// The source address the kernel picks for the default route: what registrator users expect
/// the host's address to be, without ever resolving the host name (that is how 127.0.1.1 from
/// /etc/hosts ends up registered). A UDP `connect` sends no packet; it only selects a route.
pub fn default_route_ip() -> anyhow::Result<IpAddr> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")
        .map_err(|e| anyhow::anyhow!("cannot determine the host address (binding a UDP socket: {e}); pass --advertise-ip"))?;
    // TEST-NET-3 (RFC 5737): never routed anywhere; only used to select the default route.
    sock.connect("203.0.113.1:9")
        .map_err(|e| anyhow::anyhow!("cannot determine the host address: no default route ({e}); pass --advertise-ip"))?;
    let ip = sock.local_addr().map_err(|e| anyhow::anyhow!("cannot determine the host address ({e}); pass --advertise-ip"))?.ip();
    if ip.is_loopback() || ip.is_unspecified() {
        anyhow::bail!("the default route's source address is {ip}, which other hosts cannot reach; pass --advertise-ip");
    }
    Ok(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Args {
        let mut v = vec!["upsync-sidecar"];
        v.extend_from_slice(list);
        Args::try_parse_from(v).expect("valid args")
    }

    #[test]
    fn command_line_wins_over_file_and_defaults_apply() {
        let file: FileConfig = toml::from_str(
            r#"
            node_id = "from-file"
            [consul]
            addresses = ["10.0.0.1:8500", "10.0.0.2:8500"]
            token = "file-token"
            [kv]
            prefix = "file-prefix"
            [drain]
            period = "7s"
            [services]
            tags = ["a", "b"]
            "#,
        )
        .expect("valid TOML");
        let s = Settings::merge(
            args(&["--consul", "127.0.0.1:1,127.0.0.1:2", "--kv-prefix", "/up/", "--advertise-ip", "192.0.2.10"]),
            file,
            None,
        )
        .expect("valid settings");
        let addresses: Vec<String> = s.consul.addresses.iter().map(|a| a.to_string()).collect();
        assert_eq!(addresses, ["http://127.0.0.1:1", "http://127.0.0.1:2"]);
        assert_eq!(s.kv_prefix, "up");
        assert_eq!(s.node_id, "from-file");
        assert_eq!(s.drain, Duration::from_secs(7));
        assert_eq!(s.resync, Duration::from_secs(30));
        assert_eq!(s.tags, vec!["a", "b"]);
        assert_eq!(s.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(s.consul.token.as_ref().map(|t| t.expose()), Some("file-token"));
        assert!(s.kv_enabled && s.services_enabled);
        assert_eq!(s.records_prefix(), "upsync-sidecar/from-file/endpoints/");
    }

    #[test]
    fn tokens_never_show_in_debug_output() {
        let s =
            Settings::merge(args(&["--advertise-ip", "192.0.2.10", "--node-id", "n1"]), FileConfig::default(), Some("s3cr3t-token".into()))
                .expect("valid settings");
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("s3cr3t-token"), "{dbg}");
        assert!(dbg.contains("redacted"));
    }

    #[test]
    fn unknown_file_keys_are_named() {
        let err = toml::from_str::<FileConfig>("[kv]\nprefx = \"x\"\n").expect_err("typo must fail");
        assert!(err.to_string().contains("prefx"), "{err}");
    }

    #[test]
    fn bad_values_are_refused_with_the_option_named() {
        let cases: &[(&[&str], &str)] = &[
            (&["--advertise-ip", "0.0.0.0"], "--advertise-ip"),
            (&["--advertise-ip", "192.0.2.1", "--kv-prefix", "a//b"], "--kv-prefix"),
            (&["--advertise-ip", "192.0.2.1", "--node-id", "bad id"], "--node-id"),
            (&["--advertise-ip", "192.0.2.1", "--no-kv", "--no-services"], "both outputs"),
            (&["--advertise-ip", "192.0.2.1", "--resync", "1ms"], "--resync"),
            (&["--advertise-ip", "192.0.2.1", "--listen", "0.0.0.0:8515"], "--insecure-no-token"),
            (&["--advertise-ip", "192.0.2.1", "--allow-address", "10.0.0.0/33"], "--allow-address"),
            (&["--advertise-ip", "192.0.2.1", "--container-label", "=x"], "--container-label"),
            (&["--advertise-ip", "192.0.2.1", "--container-label", "a b"], "--container-label"),
        ];
        for (a, needle) in cases {
            let err = Settings::merge(args(a), FileConfig::default(), None).expect_err("must fail");
            assert!(err.to_string().contains(needle), "{a:?}: {err}");
        }
        assert!(Args::try_parse_from(["x", "--drain", "soon"]).is_err());
        let ok = Settings::merge(
            args(&["--advertise-ip", "192.0.2.1", "--listen", "0.0.0.0:8515", "--insecure-no-token", "--allow-address", "127.0.0.1"]),
            FileConfig::default(),
            None,
        )
        .expect("allowed explicitly");
        assert_eq!(ok.allow_addresses, vec!["127.0.0.1/32".parse::<ipnet::IpNet>().unwrap()]);
        assert_eq!(ok.container_label, None);
        let file: FileConfig = toml::from_str("[engine]\ncontainer_label = \"team=web\"\n").expect("valid file");
        let s = Settings::merge(args(&["--advertise-ip", "192.0.2.1"]), file, None).expect("valid");
        assert_eq!(s.container_label.as_deref(), Some("team=web"));
    }

    #[test]
    fn state_prefix_must_stay_out_of_the_kv_prefix() {
        let file: FileConfig = toml::from_str("state_prefix = \"upstreams/sidecar\"").expect("valid TOML");
        let err = Settings::merge(args(&["--advertise-ip", "192.0.2.1"]), file, None).expect_err("must fail");
        assert!(err.to_string().contains("state_prefix"), "{err}");
    }

    #[test]
    fn the_consul_table_is_the_shared_one_and_the_former_flat_tls_keys_still_work() {
        let settings = |text: &str| {
            let file: FileConfig = toml::from_str(text).expect("valid TOML");
            Settings::merge(args(&["--advertise-ip", "192.0.2.1", "--node-id", "n1"]), file, None).expect("valid settings")
        };
        let old = settings("[consul]\naddresses = \"https://c:8501\"\nca_file = \"/ca.pem\"\ncert_file = \"/c.pem\"\nkey_file = \"/k.pem\"\nrequest_timeout = \"3s\"");
        let new = settings(
            "[consul]\naddresses = [\"https://c:8501\"]\ntls = { ca_file = \"/ca.pem\", cert_file = \"/c.pem\", key_file = \"/k.pem\" }\nrequest_timeout = 3",
        );
        assert_eq!(old.consul, new.consul);
        assert_eq!(new.consul.request_timeout, Duration::from_secs(3));
        assert!(new.deprecations.is_empty(), "{:?}", new.deprecations);
        assert_eq!(old.deprecations.len(), 3, "{:?}", old.deprecations);
        assert!(old.deprecations[0].contains("tls.ca_file"), "{:?}", old.deprecations);
        let dns_only = settings("[consul]\nconsistency = \"stale\"\ndatacenter = \"dc2\"");
        assert_eq!(dns_only.consul.datacenter.as_deref(), Some("dc2"));
        let file: FileConfig = toml::from_str("[consul]\nca_fil = \"/x\"").expect("valid TOML");
        let err = Settings::merge(args(&["--advertise-ip", "192.0.2.1"]), file, None).expect_err("unknown key");
        assert!(err.to_string().contains("unknown key `ca_fil`"), "{err}");
        let file: FileConfig = toml::from_str("[consul]\ntoken = \"a\"\ntoken_file = \"/b\"").expect("valid TOML");
        let err = Settings::merge(args(&["--advertise-ip", "192.0.2.1"]), file, None).expect_err("both tokens");
        assert!(err.to_string().contains("token and token_file are both set"), "{err}");
    }

    #[test]
    fn the_packaged_configuration_is_valid() {
        let file: FileConfig = toml::from_str(include_str!("../../packaging/upsync-sidecar/sidecar.toml")).expect("valid TOML");
        let s = Settings::merge(args(&["--advertise-ip", "192.0.2.1", "--node-id", "n1"]), file, None).expect("valid settings");
        assert!(s.deprecations.is_empty(), "{:?}", s.deprecations);
        assert_eq!(s.consul.addresses[0].to_string(), "http://127.0.0.1:8500");
    }
}
