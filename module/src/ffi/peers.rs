//! The HTTP glue of the synced peer lists (`super::generation`, shared with the stream module):
//! nginx's HTTP rr peer structs, the HTTP `hash` module's conf, and the `peer.init` wrapper
//! that pins a request to the generation it starts on.
use core::ffi::c_void;

use ngx::ffi::*;

pub use super::generation::{sync, Generation, Pending};
use super::srv_conf_of;

/// The peer structs [`Generation`] builds for this module.
pub type RrPeer = ngx_http_upstream_rr_peer_t;
pub type RrPeers = ngx_http_upstream_rr_peers_t;

/// The `hash` module's per-upstream conf (`ngx_http_upstream_hash_srv_conf_t`, private to
/// ngx_http_upstream_hash_module.c: `key, points` from nginx 1.7.2 to 1.27.2; nginx 1.27.3
/// added `config` between them when nginx has the upstream `zone` module).
///
/// From 1.27.3 on, nginx rebuilds the ring itself (and frees the old one) on a request whose
/// peer list has a non-null `config` counter that differs from `config` here. Our generations
/// leave the list's `config` null, so nginx uses the ring we install and never frees it.
#[repr(C)]
pub struct HashSrvConf {
    pub key: ngx_http_complex_value_t,
    #[cfg(all(nginx1_27_3, ngx_feature = "http_upstream_zone"))]
    pub config: ngx_uint_t,
    pub points: *mut c_void,
}

/// `us->peer.init` of a synced upstream: catch up with the shared list, pin the generation the
/// request starts on, then run the balancer's own init (round robin, keepalive, least_conn...).
pub unsafe extern "C" fn init_peer(r: *mut ngx_http_request_t, us: *mut ngx_http_upstream_srv_conf_t) -> ngx_int_t {
    // SAFETY: nginx calls peer.init with a valid request and upstream conf on the main thread.
    super::guard("the upstream peer init", NGX_ERROR as ngx_int_t, || unsafe { init_peer_inner(r, us) })
}

/// # Safety
/// What nginx passes to `peer.init`, on the main thread.
unsafe fn init_peer_inner(r: *mut ngx_http_request_t, us: *mut ngx_http_upstream_srv_conf_t) -> ngx_int_t {
    // SAFETY: nginx calls peer.init with a valid request and upstream conf on the main thread;
    // `r->upstream` is set before peer.init and the request's pool outlives its upstream work.
    unsafe {
        let Some(srv) = srv_conf_of(us) else { return NGX_ERROR as ngx_int_t };
        let Ok(pinned) = super::generation::start(srv, (*r).pool) else { return NGX_ERROR as ngx_int_t };
        let rc = match srv.original_init_peer {
            Some(init) => init(r, us),
            None => NGX_ERROR as ngx_int_t,
        };
        match pinned {
            Some(g) if rc == NGX_OK as ngx_int_t && srv.shares_failures => {
                super::generation::share_failures_of(&mut (*(*r).upstream).peer, (*r).pool, srv, g)
            }
            _ => rc,
        }
    }
}
