//! upsync-dns: a DNS server for the services registered in Consul, answering from memory.
//! See `dns/README.md` for what it serves and how it watches Consul.
#![forbid(unsafe_code)]
pub mod answer;
pub mod app;
pub mod config;
pub mod feed;
pub mod forward;
pub mod fuzzing;
pub mod http;
pub mod metrics;
pub mod names;
pub mod rrl;
pub mod server;
pub mod snapshot;
pub mod tcp;
pub mod wire;
