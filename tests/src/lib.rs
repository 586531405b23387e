//! The integration-test harness: every test in `tests/tests/` drives real processes through it.
//!
//! - [`consul::Consul`]: a real Consul agent (dev mode, or a server of a loopback cluster) on free
//!   ports, with KV and service helpers that talk to its HTTP API directly (not through
//!   `upsync-discovery`, so a bug there cannot hide behind the harness).
//! - [`nginx::Nginx`]: Debian's `/usr/sbin/nginx` with the built module, its own prefix, config,
//!   pid file and logs in the test's directory.
//! - [`etcd::Etcd`]: a real etcd 3.5 member or cluster on free ports (v2 and v3 APIs), and
//!   [`etcd::Gate`], a TCP relay in front of a member that a test cuts and opens.
//! - [`backend::Backend`]: small HTTP servers that answer with their own name; [`stream`]: UDP
//!   backends and helpers for the stream module.
//! - [`faultproxy::FaultProxy`]: a TCP proxy in front of real Consul that stalls, drops,
//!   trickles, floods or corrupts its answers on demand.
//! - [`hosts::Topology`]: several hosts on one machine (network namespaces joined by a bridge
//!   in a namespace of its own), a host cut off and healed by taking its link down and up;
//!   [`hosts::Host::run`] runs harness code, and starts processes, inside a host.
//! - [`TestDir`]: a per-test directory, removed when the test passes, kept (and its path printed)
//!   when it fails, so the logs of a failed test can be read.
//!
//! Every process is started in its own process group and stopped by PID/PGID when its guard is
//! dropped, including during a panic; children also get `PR_SET_PDEATHSIG` so they die with the
//! test process if it is killed.

pub mod backend;
pub mod consul;
pub mod dns;
pub mod docker;
pub mod engine;
pub mod etcd;
pub mod faultproxy;
pub mod hosts;
pub mod load;
pub mod net;
pub mod nginx;
pub mod paths;
pub mod podman;
pub mod proc;
pub mod sidecar;
pub mod stream;
mod testdir;
pub mod upsync;
pub mod wait;

pub use testdir::TestDir;
pub use wait::{wait_for, wait_for_value, wait_until, TimedOut};
