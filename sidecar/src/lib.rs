//! upsync-sidecar: registers the containers of this host and the endpoints a scheduler gives it
//! in Consul (agent services with checks, and upsync KV entries the nginx module reads), drains
//! them before removing them, and reconciles Consul with reality. See README.md.
pub mod config;
pub mod container;
pub mod mapping;
pub mod model;
