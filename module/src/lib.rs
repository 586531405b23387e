//! `ngx_http_upsync_module`: nginx upstream servers kept in step with Consul, without reload.
//!
//! Layout: everything that touches nginx (the only `unsafe` code of the project) is in [`ffi`];
//! the logic is in safe modules tested without nginx: directive parsing ([`conf`]), the shared
//! model ([`model`]), the dump file ([`dump`]), `upstream_show` rendering ([`show`]), the leader
//! lease ([`lease`]) and the Consul poller thread ([`poller`]). See `module/README.md`.
//!
//! The same crate is built a second time by the `module/stream` package as
//! `ngx_stream_upsync_module` (the directives inside `stream { upstream {} }`).
pub mod chash;
pub mod conf;
pub mod dump;
pub mod fails;
pub mod lease;
pub mod link;
pub mod model;
pub mod peerplan;
pub mod plan;
pub mod poller;
pub mod show;

// The HTTP module's glue, or, built as the `module/stream` package (`cfg(upsync_stream)`, set by
// build.rs), the stream module's: two .so files from the same logic, each with only its own
// nginx symbols.
#[cfg(all(not(test), not(upsync_stream)))]
mod ffi;
#[cfg(all(not(test), upsync_stream))]
#[path = "ffi/stream/mod.rs"]
mod ffi;
