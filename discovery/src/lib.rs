//! `upsync-discovery`: the Consul client shared by the upsync nginx module, `upsync-dns` and
//! `upsync-sidecar`.
//!
//! - [`endpoint`]: [`Endpoint`] and [`EndpointSet`] (stable order, [`EndpointSet::diff`]).
//! - [`decode`]: Consul responses (KV prefix, catalog service, health service, service list)
//!   to endpoint sets; bad entries are skipped with a reason, bad bodies are errors.
//! - [`config`]: [`ConsulConfig`] (addresses with failover, ACL token, TLS, dc, consistency),
//!   and [`ConsulSection`], the `[consul]` table of upsync-dns's and upsync-sidecar's files.
//! - [`client`]: [`Client`], an async HTTP/1.1 client on hyper + tokio + rustls (ring) with the
//!   KV and agent calls the sidecar needs.
//! - [`watch`]: [`Watch`], blocking-query watches with rate limiting and backoff, and
//!   [`fetch_once`] for start-up reads.
//! - [`upsync`]: nginx-upsync-module's KV value ([`upsync::KvValue`]).
//! - [`etcd`]: the same KV layout read from etcd (v2 and v3 APIs), run by [`Watch`] for
//!   [`Query::Etcd`].
//!
//! No global state, no threads, no spawned tasks: everything runs inside the caller's futures,
//! on any tokio runtime with I/O and time enabled (a current-thread runtime is enough).
//! README.md explains the choices and the watch algorithm, and gives the benchmark figures.
#![forbid(unsafe_code)]

pub mod agent;
pub mod client;
pub mod config;
pub mod decode;
pub mod duration;
pub mod endpoint;
pub mod error;
pub mod etcd;
pub mod logging;
pub mod upsync;
pub mod watch;

pub use agent::{AgentCheck, AgentService, Check, CheckKind, ServiceRegistration, ServiceWeights, Status};
pub use client::{Blocking, Client, KvPair, Method, Response, Stream};
pub use config::file::{ConsulFlags, ConsulSection};
pub use config::{Consistency, ConsulAddr, ConsulConfig, Scheme, Secret, TlsOptions};
pub use decode::{
    decode_catalog_service, decode_health_service, decode_kv, decode_kv_cached, decode_services, DecodeError, Decoded, HealthMode, KvCache,
    Skipped,
};
pub use endpoint::{Endpoint, EndpointSet, Health, Host, SetDiff};
pub use error::Error;
pub use etcd::{EtcdApi, EtcdWatch};
pub use watch::{fetch_once, Backoff, Fetched, IndexEvent, Query, RateLimit, Watch, WatchEvent, WatchOptions, WatchValue};
