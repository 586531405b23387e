//! What `upstream_show` lists, read from the running configuration: shared by the HTTP module's
//! `upstream_show` location and the stream module's `upstream_show` server (compiled into each
//! module against its own upstream and peer types, as [`super::generation`] is).
//!
//! When both modules are loaded, the HTTP `upstream_show` also lists the stream upstreams (JSON
//! and status page): the stream module exports [`STREAM_VIEWS_SYMBOL`] (`ffi/stream/show.rs`),
//! which hands its [`collect`] as JSON to the HTTP module (`ffi/show.rs`), on the worker's main
//! thread. JSON rather than the view structs: the two `.so` files are separate Rust builds (each
//! with its own allocator and layouts), and JSON is the form both already agree on.
use core::ffi::{c_void, CStr};
use core::ptr;

use super::{cycle_main_conf, cycle_upstreams, peers, shm, srv_conf_of};
use crate::show::{ServerJson, ServerView, SyncView, UpstreamView};

/// The stream module's export of its views: `ngx_stream_upsync_views_v1(only, only_len, sink,
/// ctx)` calls `sink(ctx, json, json_len)` once with the JSON array of [`collect`]`(only)` (every
/// stream upstream when `only` is null), returns `NGX_OK`, or `NGX_ERROR` without calling `sink`.
/// A change of its meaning gets a new name (`_v2`), so an HTTP module never calls a stream module
/// of another contract.
#[cfg_attr(upsync_stream, allow(dead_code))]
pub(crate) const STREAM_VIEWS_SYMBOL: &CStr = c"ngx_stream_upsync_views_v1";

/// The receiver of [`STREAM_VIEWS_SYMBOL`]'s JSON: the bytes are valid during the call only.
pub(crate) type ViewsSink = unsafe extern "C" fn(ctx: *mut c_void, json: *const u8, len: usize);

/// The type of the function exported as [`STREAM_VIEWS_SYMBOL`].
pub(crate) type StreamViewsFn =
    unsafe extern "C" fn(only: *const u8, only_len: usize, sink: ViewsSink, ctx: *mut c_void) -> ngx::ffi::ngx_int_t;

/// The PID holding the leader lease (0: none, or no synced upstream).
pub fn leader_pid() -> i64 {
    // SAFETY: content handlers run on the main thread; the header, when set, is the running
    // cycle's zone header.
    unsafe {
        match cycle_main_conf() {
            Some(main) if !main.header.is_null() => shm::leader_pid(main),
            _ => 0,
        }
    }
}

/// Every upstream of the running configuration (or only the one named `only`), as this worker
/// balances it. With `only`, the others are skipped by name before any view is built: one
/// upstream's view costs the same with 10 upstreams or 10,000.
pub fn collect(only: Option<&str>) -> Vec<UpstreamView> {
    let mut views = Vec::new();
    // SAFETY: main thread; the cycle's upstream confs and their peer lists are valid.
    unsafe {
        for &us in cycle_upstreams() {
            if only.is_some_and(|n| n.as_bytes() != (*us).host.as_bytes()) {
                continue;
            }
            let name = String::from_utf8_lossy((*us).host.as_bytes()).into_owned();
            let synced = srv_conf_of(us).filter(|s| s.sync.upsync.is_some() && s.slot.is_some());
            let Some(srv) = synced else {
                views.push(UpstreamView { name, servers: nginx_peers((*us).peer.data as *const _), sync: None });
                continue;
            };
            peers::sync(srv);
            let servers = match &srv.current {
                Some(g) => g
                    .servers
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        let (fails, active) = g.peer_state(i);
                        ServerView { server: ServerJson::from(s), fails, active }
                    })
                    .collect(),
                None => nginx_peers((*us).peer.data as *const _),
            };
            let pool = srv.shpool.map(|p| p.as_ptr()).unwrap_or(ptr::null_mut());
            let sync = srv.slot.map(|slot| {
                let (version, meta) = shm::read_meta(pool, slot.as_ptr());
                SyncView::new(srv.source.clone(), version, meta)
            });
            views.push(UpstreamView { name, servers, sync });
        }
    }
    views
}

/// The servers of an nginx round-robin list (primary, then backup).
///
/// # Safety
/// `peers` null or a valid rr peers list.
unsafe fn nginx_peers(peers: *const peers::RrPeers) -> Vec<ServerView> {
    let mut out = Vec::new();
    let mut list = peers;
    let mut backup = false;
    // SAFETY: contract; walking the lists through `peer`/`next`, under the list's lock when it
    // is in a shared zone.
    unsafe {
        let _lock = super::generation::PeersReadLock::new(peers);
        while !list.is_null() {
            let mut p = (*list).peer;
            while !p.is_null() {
                let server = String::from_utf8_lossy((*p).name.as_bytes()).into_owned();
                out.push(ServerView {
                    server: ServerJson {
                        server,
                        weight: (*p).weight as u32,
                        max_fails: (*p).max_fails as u32,
                        fail_timeout: (*p).fail_timeout as u32,
                        down: (*p).down != 0,
                        backup,
                    },
                    fails: (*p).fails as u64,
                    active: (*p).conns as u64,
                });
                p = (*p).next;
            }
            list = (*list).next;
            backup = true;
        }
    }
    out
}
