//! How to reach Consul: addresses (with failover), ACL token, TLS, datacenter, consistency,
//! timeouts.
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

pub mod file;

use crate::endpoint::{host_port, split_host_port, Host};
use crate::error::Error;

/// A secret string (an ACL token). `Debug` and `Display` print `<redacted>`; only
/// [`Secret::expose`] gives the value, to put it in the `X-Consul-Token` header.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The secret itself. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Secret {
        Secret(s)
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Secret {
        Secret(s.to_string())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Scheme {
    #[default]
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    /// Consul's default HTTP (8500) and HTTPS (8501) ports.
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 8500,
            Scheme::Https => 8501,
        }
    }
}

/// One Consul HTTP API address: `http://127.0.0.1:8500`, `https://consul.local:8501`,
/// `[::1]:8500`. An IP literal is connected to directly (never resolved).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ConsulAddr {
    pub scheme: Scheme,
    pub host: Host,
    pub port: u16,
}

impl ConsulAddr {
    /// Parses `HOST:PORT`, `http://HOST[:PORT]` or `https://HOST[:PORT]` (IPv6 in brackets).
    /// Without a scheme it is `http`; without a port 8500 (http) or 8501 (https). A trailing
    /// `/` is accepted; any other path is refused (Consul's API lives at the root).
    pub fn parse(s: &str) -> Result<ConsulAddr, Error> {
        let bad = |why: &str| Error::Config(format!("Consul address `{s}`: {why}"));
        let t = s.trim();
        let (scheme, rest) = if let Some(r) = t.strip_prefix("http://") {
            (Scheme::Http, r)
        } else if let Some(r) = t.strip_prefix("https://") {
            (Scheme::Https, r)
        } else if t.contains("://") {
            return Err(bad("only http:// and https:// are supported"));
        } else {
            (Scheme::Http, t)
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') || rest.contains('?') || rest.contains('@') {
            return Err(bad("give only scheme, host and port (no path, query or user)"));
        }
        let (host, port) = split_host_port(rest).map_err(|e| bad(&e))?;
        let host = Host::parse(host).map_err(|e| bad(&e))?;
        let port = match port {
            None => scheme.default_port(),
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p != 0 => p,
                _ => return Err(bad(&format!("`{p}` is not a port (1-65535)"))),
            },
        };
        Ok(ConsulAddr { scheme, host, port })
    }

    /// `host:port` (IPv6 in brackets), as sent in the `Host` header.
    pub fn authority(&self) -> String {
        host_port(&self.host, self.port)
    }
}

impl FromStr for ConsulAddr {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ConsulAddr::parse(s)
    }
}

/// `http://127.0.0.1:8500`
impl fmt::Display for ConsulAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme.as_str(), self.authority())
    }
}

/// HTTPS options. PEM files, as `consul tls ca create` / `consul tls cert create` write them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// CA certificate(s) that signed Consul's server certificate. `None`: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (when Consul sets `verify_incoming`), with `key_file`.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Name to verify the server certificate against instead of the address's host (e.g.
    /// `server.dc1.consul` when connecting to an IP that is not in the certificate).
    pub server_name: Option<String>,
}

/// Consul's read consistency modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Consistency {
    /// Leader answers, may be stale for a short window after a leader change.
    #[default]
    Default,
    /// Any server answers (`?stale`): spreads the load of many watchers over all servers.
    Stale,
    /// Leader confirms leadership first (`?consistent`): slowest.
    Consistent,
}

impl FromStr for Consistency {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "default" | "" => Ok(Consistency::Default),
            "stale" => Ok(Consistency::Stale),
            "consistent" => Ok(Consistency::Consistent),
            o => Err(Error::Config(format!("consistency mode `{o}`: use default, stale or consistent"))),
        }
    }
}

/// Everything [`crate::Client::new`] needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsulConfig {
    /// Tried in order; the client sticks to the first one that answers and moves to the next
    /// on connection errors, timeouts, HTTP 5xx and 429.
    pub addresses: Vec<ConsulAddr>,
    /// ACL token sent as `X-Consul-Token`.
    pub token: Option<Secret>,
    /// File holding the ACL token (whitespace trimmed); re-read when it changes, so a rotated
    /// token is picked up without a restart. Exclusive with `token`.
    pub token_file: Option<PathBuf>,
    /// Required when an address is `https://`.
    pub tls: Option<TlsOptions>,
    /// `?dc=` on catalog, health and KV requests.
    pub datacenter: Option<String>,
    pub consistency: Consistency,
    /// Limit for TCP connect + TLS handshake to one address.
    pub connect_timeout: Duration,
    /// Limit for a non-blocking request; a blocking query gets `wait + wait/16` more.
    pub request_timeout: Duration,
    /// Largest response body accepted (default 256 MiB).
    pub max_response_bytes: usize,
    /// Most TCP connections the client holds open at once, idle or busy, over all addresses
    /// (`None`: no bound). A request that finds none free waits for one; an idle connection to
    /// another address is closed to make room. Consul counts connections per client address
    /// (`http_max_conns_per_client`, 200 by default) and refuses every client on that address
    /// beyond it, so a process with many watches bounds itself here.
    pub max_connections: Option<usize>,
}

impl Default for ConsulConfig {
    fn default() -> Self {
        ConsulConfig {
            addresses: vec![ConsulAddr { scheme: Scheme::Http, host: Host::Ip([127, 0, 0, 1].into()), port: 8500 }],
            token: None,
            token_file: None,
            tls: None,
            datacenter: None,
            consistency: Consistency::Default,
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(10),
            max_response_bytes: 256 << 20,
            max_connections: None,
        }
    }
}

/// The items of a comma-separated list as the programs take them (`--consul`, `addresses`,
/// upsync-sidecar's `--tags`): trimmed, empty items dropped.
pub fn split_list(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(str::trim).filter(|t| !t.is_empty())
}

impl ConsulConfig {
    /// A config with defaults and the comma-separated `addresses` (`"a:8500,https://b:8501"`).
    pub fn from_addresses(addresses: &str) -> Result<ConsulConfig, Error> {
        let addresses = split_list(addresses).map(ConsulAddr::parse).collect::<Result<Vec<_>, _>>()?;
        if addresses.is_empty() {
            return Err(Error::Config("no Consul address given".into()));
        }
        Ok(ConsulConfig { addresses, ..ConsulConfig::default() })
    }

    /// Checks what can be checked without touching the network or the files.
    pub fn validate(&self) -> Result<(), Error> {
        if self.addresses.is_empty() {
            return Err(Error::Config("no Consul address given".into()));
        }
        if self.token.is_some() && self.token_file.is_some() {
            return Err(Error::Config("set either an ACL token or a token file, not both".into()));
        }
        if let Some(dc) = &self.datacenter {
            if dc.is_empty() || !dc.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.') {
                return Err(Error::Config(format!("datacenter `{dc}`: use letters, digits, `-`, `_`, `.`")));
            }
        }
        if let Some(t) = &self.tls {
            if t.cert_file.is_some() != t.key_file.is_some() {
                return Err(Error::Config("TLS client certificate: give both cert_file and key_file".into()));
            }
        }
        if self.connect_timeout.is_zero() || self.request_timeout.is_zero() {
            return Err(Error::Config("connect_timeout and request_timeout must be above zero".into()));
        }
        if self.max_connections == Some(0) {
            return Err(Error::Config("max_connections must be at least 1".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        let a = ConsulAddr::parse("127.0.0.1:8500").unwrap();
        assert_eq!(a.to_string(), "http://127.0.0.1:8500");
        assert_eq!(ConsulAddr::parse("https://consul.local").unwrap().to_string(), "https://consul.local:8501");
        assert_eq!(ConsulAddr::parse("http://[::1]:9/").unwrap().to_string(), "http://[::1]:9");
        assert_eq!(ConsulAddr::parse("[::1]").unwrap().port, 8500);
        for bad in ["", "ftp://x", "h:0", "h:70000", "http://h:1/v1", "[::1", "a b:1", "u@h:1"] {
            assert!(ConsulAddr::parse(bad).is_err(), "{bad:?} accepted");
        }
        let c = ConsulConfig::from_addresses(" 127.0.0.1:1, https://h:2 ,").unwrap();
        assert_eq!(c.addresses.len(), 2);
        assert!(ConsulConfig::from_addresses(" , ").is_err());
    }

    #[test]
    fn secret_is_redacted() {
        let c = ConsulConfig { token: Some(Secret::new("s3cr3t-token")), ..Default::default() };
        let shown = format!("{c:?} {}", c.token.as_ref().unwrap());
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }
}
