//! The stream module's glue (`ngx_stream_upsync_module`): `upsync`, `upsync_dump_path`,
//! `upsync_lb` and the other upstream directives inside `stream { upstream NAME {} }`, and
//! `upstream_show` as a stream server's handler. Built only by the `module/stream` package
//! (`cfg(upsync_stream)`).
//!
//! Everything but the nginx types is the HTTP module's: the shared zone ([`shm`]), the leader
//! lease and the poller thread ([`worker`]), the log ([`log`]), the directive handlers and main
//! conf ([`common`]) are the same source files, compiled here against this glue's `SrvConf`.
//! What differs: the module table and its stream context, the stream upstream types in
//! [`peers`] (the peer lists themselves are built by the HTTP module's [`generation`]), and [`show`] writing the listing to a client that connects.
use core::ffi::{c_char, c_void, CStr};
use core::ptr;
use std::rc::Rc;

use ngx::core::{Pool, NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::ffi::*;
use ngx::{ngx_conf_log_error, ngx_string};

use crate::conf::{self, Lb, UpstreamSync};

#[path = "../addr.rs"]
mod addr;
#[path = "../common.rs"]
mod common;
#[path = "../generation.rs"]
mod generation;
#[path = "../log.rs"]
mod log;
mod peers;
#[path = "../shm.rs"]
mod shm;
mod show;
#[path = "../worker.rs"]
mod worker;

pub(crate) use common::*;

/// The stream module's shared zone (the HTTP module's is `upsync`): both modules may be loaded
/// in one nginx, each with its own leader and slots.
const ZONE_NAME: &str = "upsync_stream";
/// How nginx's slab allocator names the zone in its messages.
const ZONE_LOG_CTX: &CStr = c" in upsync zone \"upsync_stream\"";

fn zone_tag() -> *mut c_void {
    ptr::addr_of_mut!(ngx_stream_upsync_module) as *mut c_void
}

/// Per-upstream-block configuration and, in workers, per-upstream runtime state (the stream
/// counterpart of the HTTP module's `SrvConf`, with the same fields for the shared code).
#[derive(Default)]
pub struct SrvConf {
    pub sync: UpstreamSync,
    us: Option<ptr::NonNull<ngx_stream_upstream_srv_conf_t>>,
    /// `us->peer.init` before we wrapped it (round robin, least_conn, hash).
    original_init_peer: ngx_stream_upstream_init_peer_pt,
    slot: Option<ptr::NonNull<shm::Slot>>,
    shpool: Option<ptr::NonNull<ngx_slab_pool_t>>,
    key: u64,
    source: String,
    local_version: u64,
    current: Option<Rc<peers::Generation>>,
    /// A large list being built on a builder thread.
    building: Option<generation::Pending>,
    hash_lb: Option<Lb>,
    /// With nginx's `hash KEY consistent;`: its per-upstream conf, whose ring every new list
    /// replaces.
    chash: Option<ptr::NonNull<peers::HashSrvConf>>,
    /// The upstream has `zone`: its servers' failure state is shared between workers.
    shares_failures: bool,
    fail_epoch_seen: u64,
    fail_applied: Vec<std::net::SocketAddr>,
}

const UPS: ngx_uint_t = NGX_STREAM_UPS_CONF as ngx_uint_t;
const SRV: usize = NGX_STREAM_SRV_CONF_OFFSET;
const MAIN: usize = NGX_STREAM_MAIN_CONF_OFFSET;

static mut COMMANDS: [ngx_command_t; 11] = [
    command(ngx_string!("upsync"), UPS | NGX_CONF_1MORE as ngx_uint_t, set_upsync, SRV),
    command(ngx_string!("upsync_dump_path"), UPS | NGX_CONF_TAKE1 as ngx_uint_t, set_dump_path, SRV),
    command(ngx_string!("upsync_lb"), UPS | NGX_CONF_TAKE1 as ngx_uint_t, set_lb, SRV),
    command(ngx_string!("upsync_token"), UPS | NGX_CONF_TAKE1 as ngx_uint_t, set_token, SRV),
    command(ngx_string!("upsync_token_file"), UPS | NGX_CONF_TAKE1 as ngx_uint_t, set_token_file, SRV),
    command(ngx_string!("upsync_tls"), UPS | NGX_CONF_1MORE as ngx_uint_t, set_tls, SRV),
    command(ngx_string!("upsync_allow_empty"), UPS | NGX_CONF_FLAG as ngx_uint_t, set_allow_empty, SRV),
    command(ngx_string!("upsync_shm_size"), (NGX_STREAM_MAIN_CONF | NGX_CONF_TAKE1) as ngx_uint_t, set_shm_size, MAIN),
    command(ngx_string!("upsync_consul_connections"), (NGX_STREAM_MAIN_CONF | NGX_CONF_TAKE1) as ngx_uint_t, set_consul_connections, MAIN),
    command(ngx_string!("upstream_show"), (NGX_STREAM_SRV_CONF | NGX_CONF_NOARGS) as ngx_uint_t, set_show, 0),
    ngx_command_t::empty(),
];

static CTX: ngx_stream_module_t = ngx_stream_module_t {
    preconfiguration: None,
    postconfiguration: Some(postconfiguration),
    create_main_conf: Some(create_main_conf),
    init_main_conf: None,
    create_srv_conf: Some(create_srv_conf),
    merge_srv_conf: None,
};

ngx::ngx_modules!(ngx_stream_upsync_module);

#[used]
#[allow(non_upper_case_globals)]
#[no_mangle]
pub static mut ngx_stream_upsync_module: ngx_module_t = ngx_module_t {
    ctx: ptr::addr_of!(CTX) as _,
    // SAFETY: taking the address of a static; nginx reads the array, never frees it.
    commands: unsafe { ptr::addr_of_mut!(COMMANDS[0]) },
    type_: NGX_STREAM_MODULE as _,
    init_module: Some(worker::init_module),
    init_process: Some(worker::init_process),
    exit_process: Some(worker::exit_process),
    ..ngx_module_t::default()
};

fn module() -> &'static ngx_module_t {
    // SAFETY: the module static is only written by nginx while it loads the module.
    unsafe { &*ptr::addr_of!(ngx_stream_upsync_module) }
}

unsafe extern "C" fn create_main_conf(cf: *mut ngx_conf_t) -> *mut c_void {
    // SAFETY: nginx passes a valid cf; the pool runs MainConf's drop when it is destroyed.
    guard("create_main_conf", ptr::null_mut(), || unsafe { Pool::from_ngx_pool((*cf).pool).allocate(MainConf::default()) as *mut c_void })
}

unsafe extern "C" fn create_srv_conf(cf: *mut ngx_conf_t) -> *mut c_void {
    // SAFETY: as above.
    guard("create_srv_conf", ptr::null_mut(), || unsafe { Pool::from_ngx_pool((*cf).pool).allocate(SrvConf::default()) as *mut c_void })
}

/// `upsync_lb`: round robin is nginx's default; least_conn runs the stream `least_conn`
/// directive; `hash_modula` and `hash_ketama` need the block's own `hash KEY;` or
/// `hash KEY consistent;` (checked in postconfiguration). Stream has no `ip_hash`: refused with
/// the alternative.
extern "C" fn set_lb(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, conf: *mut c_void) -> *mut c_char {
    guard("\"upsync_lb\" directive", NGX_CONF_ERROR, || {
        // SAFETY: cf is valid during the handler.
        let lb = match unsafe { args(&*cf) }.and_then(|a| conf::parse_lb(a[0])) {
            Ok(lb) => lb,
            Err(e) => return conf_error(cf, "upsync_lb", &e),
        };
        match lb {
            Lb::RoundRobin => NGX_CONF_OK,
            Lb::HashModula | Lb::HashKetama => {
                // SAFETY: registered with the srv conf offset: conf is our SrvConf.
                unsafe { (*(conf as *mut SrvConf)).hash_lb = Some(lb) };
                NGX_CONF_OK
            }
            Lb::IpHash => {
                conf_error(cf, "upsync_lb", "nginx's stream module has no ip_hash; use \"hash $remote_addr;\" with upsync_lb hash_modula")
            }
            // SAFETY: cf is the directive's; the stream least_conn handler only uses cf.
            Lb::LeastConn => unsafe { run_directive(cf, conf, "ngx_stream_upstream_least_conn_module", "least_conn") },
        }
    })
}

/// Runs nginx's own directive `directive` of module `module_name` (found among the loaded
/// modules) with the current arguments.
///
/// # Safety
/// `cf`/`conf` are what nginx passed to a directive handler; the directive takes no arguments.
unsafe fn run_directive(cf: *mut ngx_conf_t, conf: *mut c_void, module_name: &str, directive: &str) -> *mut c_char {
    // SAFETY: cf->cycle->modules is the cycle's NULL-terminated module list; each commands
    // array ends with an entry whose name.len is 0.
    unsafe {
        if let Some(module) = find_module((*cf).cycle, module_name) {
            let mut c = module.commands;
            while !c.is_null() && (*c).name.len != 0 {
                if (*c).name.as_bytes() == directive.as_bytes() {
                    if let Some(set) = (*c).set {
                        return set(cf, c, conf);
                    }
                    break;
                }
                c = c.add(1);
            }
        }
    }
    conf_error(cf, "upsync_lb", &format!("nginx has no stream \"{directive}\" directive ({module_name} is not built in)"))
}

/// `upstream_show` in a stream `server {}`: a client that connects gets the listing.
extern "C" fn set_show(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, _conf: *mut c_void) -> *mut c_char {
    guard("\"upstream_show\" directive", NGX_CONF_ERROR, || {
        // SAFETY: in a stream server block, cf->ctx is its ngx_stream_conf_ctx_t and the core
        // module's srv conf an ngx_stream_core_srv_conf_t.
        unsafe {
            let ctx = (*cf).ctx as *mut ngx_stream_conf_ctx_t;
            let cscf = *(*ctx).srv_conf.add(ngx_stream_core_module.ctx_index) as *mut ngx_stream_core_srv_conf_t;
            if (*cscf).handler.is_some() {
                return conf_error(cf, "upstream_show", "this server already has a handler (proxy_pass, return...)");
            }
            (*cscf).handler = Some(show::handler);
        }
        NGX_CONF_OK
    })
}

unsafe extern "C" fn postconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
    // SAFETY: nginx calls postconfiguration with a valid cf inside the stream{} block.
    guard("postconfiguration", NGX_ERROR as ngx_int_t, || unsafe { postconfigure(&mut *cf) })
}

/// After the whole stream{} block is parsed (every upstream's balancer initialised): wrap the
/// peer init of each synced upstream and create the shared zone.
///
/// # Safety
/// `cf` must be the conf nginx passes to postconfiguration.
unsafe fn postconfigure(cf: &mut ngx_conf_t) -> ngx_int_t {
    log::init();
    // SAFETY: in postconfiguration, cf->ctx is the stream{} conf ctx with every module's main conf.
    let (main, umcf) = unsafe {
        let ctx = cf.ctx as *mut ngx_stream_conf_ctx_t;
        let main = &mut *(*(*ctx).main_conf.add(module().ctx_index) as *mut MainConf);
        let umcf = &mut *(*(*ctx).main_conf.add(ngx_stream_upstream_module.ctx_index) as *mut ngx_stream_upstream_main_conf_t);
        (main, umcf)
    };
    // SAFETY: umcf->upstreams is an array of ngx_stream_upstream_srv_conf_t pointers.
    let upstreams: &[*mut ngx_stream_upstream_srv_conf_t] = unsafe { umcf.upstreams.as_slice() };
    for &uscf in upstreams {
        // SAFETY: every element is a valid upstream conf of this cycle; implicit upstreams
        // (proxy_pass ADDR) have no srv_conf array.
        let us = unsafe { &mut *uscf };
        if us.srv_conf.is_null() {
            continue;
        }
        // SAFETY: srv_conf holds every stream module's srv conf for this upstream block.
        let srv = unsafe { &mut *(*us.srv_conf.add(module().ctx_index) as *mut SrvConf) };
        let name = String::from_utf8_lossy(us.host.as_bytes()).into_owned();
        if let Err(e) = conf::validate_block(&srv.sync) {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "upsync: upstream \"{}\": {}", name, e);
            return NGX_ERROR as ngx_int_t;
        }
        let Some(u) = &srv.sync.upsync else { continue };
        // As in HTTP: nginx >= 1.27.3 resolves `server NAME resolve;` itself and edits the peers
        // it made from it: never in a list upsync replaces.
        #[cfg(all(nginx1_27_3, ngx_feature = "stream_upstream_zone"))]
        // SAFETY: us is a configured upstream block; servers is its array of servers.
        if let Some(server) = unsafe { resolve_server(us) } {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "upsync: {}", conf::resolve_refusal(&name, &server));
            return NGX_ERROR as ngx_int_t;
        }
        if us.peer.init.is_none() {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "upsync: upstream \"{}\" has no balancer initialised", name);
            return NGX_ERROR as ngx_int_t;
        }
        // nginx's stream `hash` in this block: a key, and whether its init built a ring.
        // SAFETY: cf->cycle is the cycle being configured; the hash module's srv conf of this
        // upstream is a peers::HashSrvConf (zeroed at creation).
        let hcf = unsafe {
            find_module(cf.cycle, "ngx_stream_upstream_hash_module")
                .map(|m| *us.srv_conf.add(m.ctx_index) as *mut peers::HashSrvConf)
                .filter(|h| !h.is_null())
        };
        // SAFETY: as above.
        let (hash, consistent) = hcf.map(|h| unsafe { (!(*h).key.value.data.is_null(), !(*h).points.is_null()) }).unwrap_or((false, false));
        // nginx >= 1.27.3 builds no ring at configuration time in an upstream with `zone`.
        #[cfg(all(nginx1_27_3, ngx_feature = "stream_upstream_zone"))]
        let ring_built_lazily = !us.shm_zone.is_null();
        #[cfg(not(all(nginx1_27_3, ngx_feature = "stream_upstream_zone")))]
        let ring_built_lazily = false;
        let ring = match conf::hash_ring(srv.hash_lb, hash, consistent, ring_built_lazily) {
            Ok(ring) => ring,
            Err(e) => {
                ngx_conf_log_error!(NGX_LOG_EMERG, cf, "upsync: upstream \"{}\": {}", name, e);
                return NGX_ERROR as ngx_int_t;
            }
        };
        srv.chash = if ring { hcf.and_then(ptr::NonNull::new) } else { None };
        srv.shares_failures = !us.shm_zone.is_null();
        srv.source = format!("{}{}", u.addresses[0], u.path);
        srv.key = crate::model::slot_key(&name, u);
        srv.original_init_peer = us.peer.init;
        us.peer.init = Some(peers::init_peer);
        srv.us = ptr::NonNull::new(uscf);
        main.upstreams.push(srv as *mut SrvConf);
    }
    if main.upstreams.is_empty() {
        return NGX_OK as ngx_int_t;
    }
    let size = main.shm_size.unwrap_or(DEFAULT_SHM_SIZE);
    // SAFETY: cf is valid during postconfiguration; main lives as long as the cycle.
    match unsafe { shm::add_zone(cf, main, size) } {
        Ok(()) => NGX_OK as ngx_int_t,
        Err(e) => {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "upsync: {}", e);
            NGX_ERROR as ngx_int_t
        }
    }
}

/// The main conf of the running cycle, if the stream{} block exists and loads us.
///
/// # Safety
/// Main thread of a worker or the master.
unsafe fn cycle_main_conf() -> Option<&'static mut MainConf> {
    // SAFETY: ngx_cycle is valid on the main thread.
    unsafe { main_conf_of(ngx_cycle as *mut ngx_cycle_t) }
}

/// Our main conf in `cycle`, if its stream{} block exists and loads us.
///
/// # Safety
/// `cycle` null or a cycle whose configuration nginx has parsed; main thread.
unsafe fn main_conf_of(cycle: *mut ngx_cycle_t) -> Option<&'static mut MainConf> {
    // SAFETY: contract; conf_ctx holds the stream conf ctx at the stream module's index.
    unsafe {
        if cycle.is_null() || (*cycle).conf_ctx.is_null() {
            return None;
        }
        let stream = *(*cycle).conf_ctx.add(ngx_stream_module.index) as *mut ngx_stream_conf_ctx_t;
        if stream.is_null() {
            return None;
        }
        let main = *(*stream).main_conf.add(module().ctx_index) as *mut MainConf;
        main.as_mut()
    }
}

/// Every stream upstream of the running cycle (synced or not).
///
/// # Safety
/// Main thread only.
unsafe fn cycle_upstreams() -> &'static [*mut ngx_stream_upstream_srv_conf_t] {
    // SAFETY: as cycle_main_conf.
    unsafe {
        let cycle = ngx_cycle;
        if cycle.is_null() || (*cycle).conf_ctx.is_null() {
            return &[];
        }
        let stream = *(*cycle).conf_ctx.add(ngx_stream_module.index) as *mut ngx_stream_conf_ctx_t;
        if stream.is_null() {
            return &[];
        }
        let umcf = *(*stream).main_conf.add(ngx_stream_upstream_module.ctx_index) as *mut ngx_stream_upstream_main_conf_t;
        if umcf.is_null() {
            return &[];
        }
        (*umcf).upstreams.as_slice()
    }
}

/// Our srv conf of a stream upstream, if it has one.
///
/// # Safety
/// `us` must be a valid upstream conf.
unsafe fn srv_conf_of(us: *mut ngx_stream_upstream_srv_conf_t) -> Option<&'static mut SrvConf> {
    // SAFETY: contract; srv_conf is NULL for implicit upstreams.
    unsafe {
        if (*us).srv_conf.is_null() {
            return None;
        }
        (*(*us).srv_conf.add(module().ctx_index) as *mut SrvConf).as_mut()
    }
}

/// The first server of the block with nginx's own `resolve` (nginx >= 1.27.3 keeps the name of
/// a server resolved at run time in `host`), as written in the config.
///
/// # Safety
/// `us` is an upstream block of the cycle being configured.
#[cfg(all(nginx1_27_3, ngx_feature = "stream_upstream_zone"))]
unsafe fn resolve_server(us: &ngx_stream_upstream_srv_conf_t) -> Option<String> {
    if us.servers.is_null() {
        return None;
    }
    // SAFETY: contract; `servers` is an array of ngx_stream_upstream_server_t.
    let servers: &[ngx_stream_upstream_server_t] = unsafe { (*us.servers).as_slice() };
    servers.iter().find(|s| s.host.len != 0).map(|s| String::from_utf8_lossy(s.name.as_bytes()).into_owned())
}
