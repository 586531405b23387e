//! `ngx_http_upsync_module`: nginx upstream servers kept in step with Consul, without reload.
//!
//! Layout: everything that touches nginx (the only `unsafe` code of the project) is in [`ffi`];
//! the logic is in safe modules tested without nginx: directive parsing ([`conf`]), the shared
//! model ([`model`]), the dump file ([`dump`]), `upstream_show` rendering ([`show`]), the leader
//! lease ([`lease`]) and the Consul poller thread ([`poller`]). See `module/README.md`.
pub mod chash;
pub mod conf;
pub mod dump;
pub mod fails;
pub mod lease;
pub mod model;
pub mod plan;
pub mod poller;
pub mod show;

#[cfg(not(test))]
mod ffi;
