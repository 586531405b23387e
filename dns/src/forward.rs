//! Forwarding of names outside the zone (the "dnscache" part), on hickory-resolver: it sends
//! to the upstreams (UDP, TCP when truncated), fails over between them, and caches positive
//! and negative answers for their TTL (RFC 2308 for the negative ones), counting TTLs down.
use std::net::{IpAddr, SocketAddr};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{Name, Record, RecordType};
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::TokioResolver;
use ipnet::IpNet;

use crate::config::ForwardConfig;

/// The upstream's answer, ready to be copied into a response.
#[derive(Debug, Default)]
pub struct Forwarded {
    pub rcode: ResponseCode,
    pub answers: Vec<Record>,
    pub authority: Vec<Record>,
}

pub struct Forwarder {
    resolver: TokioResolver,
    allow: Vec<IpNet>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder").field("allow", &self.allow).finish()
    }
}

impl Forwarder {
    /// `None` when no upstream is configured (forwarding off).
    pub fn new(cfg: &ForwardConfig) -> anyhow::Result<Option<Forwarder>> {
        if cfg.upstreams.is_empty() {
            return Ok(None);
        }
        let servers = cfg
            .upstreams
            .iter()
            .map(|a: &SocketAddr| {
                let mut udp = ConnectionConfig::udp();
                udp.port = a.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = a.port();
                NameServerConfig::new(a.ip(), true, vec![udp, tcp])
            })
            .collect();
        let mut opts = ResolverOpts::default();
        opts.cache_size = cfg.cache_size;
        opts.timeout = cfg.timeout;
        opts.attempts = 1;
        opts.use_hosts_file = ResolveHosts::Never;
        opts.ndots = 0;
        opts.preserve_intermediates = true;
        opts.num_concurrent_reqs = 1;
        opts.max_active_requests = 1024;
        let resolver = TokioResolver::builder_with_config(ResolverConfig::from_name_servers(servers), TokioRuntimeProvider::default())
            .with_options(opts)
            .build()
            .map_err(|e| anyhow::anyhow!("setting up the forwarding resolver: {e}"))?;
        Ok(Some(Forwarder { resolver, allow: cfg.allow_recursion.clone() }))
    }

    /// Whether `client` may have names outside the zone resolved.
    pub fn allows(&self, client: IpAddr) -> bool {
        allowed(&self.allow, client)
    }

    /// Resolves `name`/`qtype` through the cache and the upstreams. Upstream failures
    /// (timeouts, SERVFAIL) give SERVFAIL.
    pub async fn resolve(&self, name: Name, qtype: RecordType) -> Forwarded {
        match self.resolver.lookup(name.clone(), qtype).await {
            Ok(lookup) => Forwarded { rcode: ResponseCode::NoError, answers: lookup.answers().to_vec(), authority: Vec::new() },
            Err(NetError::Dns(DnsError::NoRecordsFound(nr))) => Forwarded {
                rcode: nr.response_code,
                answers: Vec::new(),
                authority: nr.soa.map(|soa| vec![soa.into_record_of_rdata()]).unwrap_or_default(),
            },
            Err(NetError::Dns(DnsError::ResponseCode(code))) => Forwarded { rcode: code, ..Forwarded::default() },
            Err(e) => {
                tracing::debug!(%name, %qtype, "forwarding failed: {e}");
                Forwarded { rcode: ResponseCode::ServFail, ..Forwarded::default() }
            }
        }
    }
}

/// `client` is in one of `nets` (IPv4-mapped IPv6 clients count as IPv4).
pub fn allowed(nets: &[IpNet], client: IpAddr) -> bool {
    let client = client.to_canonical();
    nets.iter().any(|n| n.contains(&client))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list() {
        let nets: Vec<IpNet> = vec!["127.0.0.1/32".parse().unwrap(), "fd00::/8".parse().unwrap()];
        assert!(allowed(&nets, "127.0.0.1".parse().unwrap()));
        assert!(allowed(&nets, "::ffff:127.0.0.1".parse().unwrap()));
        assert!(!allowed(&nets, "127.0.0.2".parse().unwrap()));
        assert!(allowed(&nets, "fd00::1".parse().unwrap()));
        assert!(!allowed(&[], "127.0.0.1".parse().unwrap()));
    }
}
