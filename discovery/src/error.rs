//! Errors that say what failed: the Consul address, the request, the HTTP status and
//! Consul's own message, and what to do about it.
use std::time::Duration;

use crate::config::ConsulAddr;
use crate::decode::DecodeError;

/// An error of the client or a watch. `Clone` so a caller can keep the last one for display.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is unusable (bad address, unreadable CA file, both token and token file...).
    #[error("invalid Consul client configuration: {0}")]
    Config(String),

    /// TCP connect (or name resolution) failed.
    #[error("cannot connect to Consul at {address}: {message}; check that the agent runs and listens there")]
    Connect { address: ConsulAddr, message: String },

    /// The TLS handshake failed (unknown CA, wrong name, client certificate refused...).
    #[error("TLS handshake with Consul at {address} failed: {message}; check the CA file, the server certificate's names and the client certificate")]
    Tls { address: ConsulAddr, message: String },

    /// No complete answer within the limit.
    #[error("Consul at {address} did not answer {method} {path} within {after:?}")]
    Timeout { address: ConsulAddr, method: String, path: String, after: Duration },

    /// Consul began to answer but the answer did not complete within the transfer limit
    /// (`request_timeout`, counted from its first byte): a connection that stalls mid-body or
    /// trickles bytes. The connection is closed.
    #[error("Consul at {address} began answering {method} {path} but the answer was not complete {after:?} later (stalled or trickling connection); the connection was closed; check the network path to Consul (proxies, load balancers, packet loss)")]
    Stalled { address: ConsulAddr, method: String, path: String, after: Duration },

    /// The connection broke during the exchange, or the answer was not valid HTTP.
    #[error("HTTP exchange with Consul at {address} failed ({method} {path}): {message}")]
    Transport { address: ConsulAddr, method: String, path: String, message: String },

    /// HTTP 403 "Permission denied" / "ACL not found": the token is missing, unknown or lacks
    /// a rule for this resource.
    #[error("ACL token rejected by Consul at {address} ({method} {path}: HTTP {status} {message}); give a token whose policy allows this request")]
    AclDenied { address: ConsulAddr, method: String, path: String, status: u16, message: String },

    /// Any other non-success status.
    #[error("Consul at {address} answered {method} {path} with HTTP {status}: {message}")]
    Http { address: ConsulAddr, method: String, path: String, status: u16, message: String },

    /// The body is not what this request returns.
    #[error("Consul at {address} sent a response to {path} that cannot be used: {error}")]
    Decode { address: ConsulAddr, path: String, error: DecodeError },

    /// The body exceeds `ConsulConfig::max_response_bytes`.
    #[error("the response of Consul at {address} to {path} exceeds {limit} bytes; raise max_response_bytes or narrow the query")]
    TooLarge { address: ConsulAddr, path: String, limit: usize },

    /// An etcd member could not be reached or answered with an error ([`crate::etcd`] words
    /// the client's errors for etcd: `message` says what failed and what to do).
    #[error("etcd at {address}: {message}")]
    Etcd { address: ConsulAddr, message: String },
}

/// Messages of HTTP 500 answers that repeating the request will not change (Consul 1.8 agent).
const PERMANENT_500: &[&str] = &["does not have associated TTL", "Unknown service", "Unknown check"];

impl Error {
    /// The token was refused (HTTP 403 with Consul's ACL messages).
    pub fn is_acl_denied(&self) -> bool {
        matches!(self, Error::AclDenied { .. })
    }

    /// Consul could not be reached or was temporarily unable to answer (connect errors,
    /// timeouts, broken connections, HTTP 5xx and 429): the same request may succeed later,
    /// so a writer should queue it and retry. Everything else (bad token, bad request,
    /// configuration, TLS trust) will fail again until someone changes something.
    ///
    /// Consul 1.8's agent answers some requests it will never accept with HTTP 500 too
    /// (`CheckID "x" does not have associated TTL`, `Unknown service ID`...): those are not
    /// transient.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::Timeout { .. } | Error::Stalled { .. } | Error::Transport { .. } => true,
            Error::Http { status: 429, .. } => true,
            Error::Http { status, message, .. } if *status >= 500 => !PERMANENT_500.iter().any(|m| message.contains(m)),
            _ => false,
        }
    }

    /// The HTTP status Consul answered with, if it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::AclDenied { status, .. } | Error::Http { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The Consul address involved, if any.
    pub fn address(&self) -> Option<&ConsulAddr> {
        match self {
            Error::Config(_) => None,
            Error::Connect { address, .. }
            | Error::Tls { address, .. }
            | Error::Timeout { address, .. }
            | Error::Stalled { address, .. }
            | Error::Transport { address, .. }
            | Error::AclDenied { address, .. }
            | Error::Http { address, .. }
            | Error::Decode { address, .. }
            | Error::TooLarge { address, .. }
            | Error::Etcd { address, .. } => Some(address),
        }
    }

    /// Whether trying another Consul address may help (the address itself is the problem).
    pub(crate) fn should_fail_over(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::Tls { .. } | Error::Timeout { .. } | Error::Stalled { .. } | Error::Transport { .. } => true,
            Error::Http { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }
}
