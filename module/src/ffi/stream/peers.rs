//! The stream glue of the synced peer lists (`ffi/generation.rs`, shared with the HTTP module):
//! nginx's stream rr peer structs and the `peer.init` wrapper that pins a session to the
//! generation it starts on (until its connection's pool is destroyed, so an established
//! connection to a removed server keeps its peer until it closes).
use core::ffi::c_void;

use ngx::ffi::*;

pub use super::generation::{sync, Generation};
use super::srv_conf_of;

/// The peer structs [`Generation`] builds for this module.
pub type RrPeer = ngx_stream_upstream_rr_peer_t;
pub type RrPeers = ngx_stream_upstream_rr_peers_t;

/// The stream `hash` module's per-upstream conf (`ngx_stream_upstream_hash_srv_conf_t`, private
/// to ngx_stream_upstream_hash_module.c: `key, points`; nginx 1.27.3 put `config` before them
/// when nginx has the upstream `zone` module, unlike the HTTP conf, where it sits between them).
///
/// From 1.27.3 on, nginx rebuilds the ring itself (and frees the old one) on a session whose
/// peer list has a non-null `config` counter that differs from `config` here. Our generations
/// leave the list's `config` null, so nginx uses the ring we install and never frees it.
#[repr(C)]
pub struct HashSrvConf {
    #[cfg(all(nginx1_27_3, ngx_feature = "stream_upstream_zone"))]
    pub config: ngx_uint_t,
    pub key: ngx_stream_complex_value_t,
    pub points: *mut c_void,
}

/// `us->peer.init` of a synced stream upstream: catch up with the shared list, pin the
/// generation the session starts on, then run the balancer's own init.
pub unsafe extern "C" fn init_peer(s: *mut ngx_stream_session_t, us: *mut ngx_stream_upstream_srv_conf_t) -> ngx_int_t {
    // SAFETY: nginx calls peer.init with a valid session and upstream conf on the main thread.
    super::guard("the stream upstream peer init", NGX_ERROR as ngx_int_t, || unsafe { init_peer_inner(s, us) })
}

/// # Safety
/// What nginx passes to `peer.init`, on the main thread.
unsafe fn init_peer_inner(s: *mut ngx_stream_session_t, us: *mut ngx_stream_upstream_srv_conf_t) -> ngx_int_t {
    // SAFETY: contract; `s->upstream` is set before peer.init and the session's connection pool
    // lives as long as the session.
    unsafe {
        let Some(srv) = srv_conf_of(us) else { return NGX_ERROR as ngx_int_t };
        let pool = (*(*s).connection).pool;
        let Ok(pinned) = super::generation::start(srv, pool) else { return NGX_ERROR as ngx_int_t };
        let rc = match srv.original_init_peer {
            Some(init) => init(s, us),
            None => NGX_ERROR as ngx_int_t,
        };
        match pinned {
            Some(g) if rc == NGX_OK as ngx_int_t && srv.shares_failures => {
                super::generation::share_failures_of(&mut (*(*s).upstream).peer, pool, srv, g)
            }
            _ => rc,
        }
    }
}
