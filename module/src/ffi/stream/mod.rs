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

use ngx::core::{CoreModule, CoreModuleMainConf, Pool, NGX_CONF_ERROR, NGX_CONF_OK};
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
#[path = "../views.rs"]
mod views;
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
    /// In a stream `server {}` with `upstream_show FORMAT;`: the form of the listing.
    show_format: Option<crate::show::Format>,
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
    command(ngx_string!("upstream_show"), (NGX_STREAM_SRV_CONF | NGX_CONF_NOARGS | NGX_CONF_TAKE1) as ngx_uint_t, set_show, SRV),
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

/// `upstream_show [text|json|prometheus];` in a stream `server {}`: a client that connects gets
/// the listing in that form (text, nginx-upsync-module's, by default).
extern "C" fn set_show(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, conf: *mut c_void) -> *mut c_char {
    guard("\"upstream_show\" directive", NGX_CONF_ERROR, || {
        // SAFETY: nginx passes the directive's cf.
        let format = match unsafe { args(&*cf) }.map(|a| a.first().map(|f| crate::show::Format::from_conf(f))) {
            Ok(None) => crate::show::Format::Text,
            Ok(Some(Ok(f))) => f,
            Ok(Some(Err(e))) | Err(e) => return conf_error(cf, "upstream_show", &e),
        };
        // SAFETY: the directive's offset is SRV: conf is this server block's SrvConf.
        unsafe { (*(conf as *mut SrvConf)).show_format = Some(format) };
        // SAFETY: in a stream server block, cf->ctx is its ngx_stream_conf_ctx_t, whose srv_conf
        // holds the core module's ngx_stream_core_srv_conf_t.
        let cscf = unsafe { conf_ctx(&*cf).and_then(|ctx| module_conf::<ngx_stream_core_srv_conf_t>(ctx.srv_conf, core_module())) };
        let Some(cscf) = cscf else { return NGX_CONF_ERROR };
        if cscf.handler.is_some() {
            return conf_error(cf, "upstream_show", "this server already has a handler (proxy_pass, return...)");
        }
        cscf.handler = Some(show::handler);
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
    // SAFETY: in postconfiguration, cf->ctx is the stream{} conf ctx with every stream module's
    // main conf: ours a MainConf, the upstream module's an ngx_stream_upstream_main_conf_t.
    let (main, umcf) = unsafe {
        let ctx = conf_ctx(cf);
        (
            ctx.and_then(|c| module_conf::<MainConf>(c.main_conf, module())),
            ctx.and_then(|c| module_conf::<ngx_stream_upstream_main_conf_t>(c.main_conf, upstream_module())),
        )
    };
    let (Some(main), Some(umcf)) = (main, umcf) else {
        ngx_conf_log_error!(NGX_LOG_EMERG, cf, "upsync: the stream{{}} block has no upstream configuration");
        return NGX_ERROR as ngx_int_t;
    };
    // SAFETY: umcf->upstreams is an array of ngx_stream_upstream_srv_conf_t pointers.
    let upstreams: &[*mut ngx_stream_upstream_srv_conf_t] = unsafe { umcf.upstreams.as_slice() };
    for &uscf in upstreams {
        // SAFETY: every element is a valid upstream conf of this cycle.
        let us = unsafe { &mut *uscf };
        // Implicit upstreams (proxy_pass ADDR) have no srv_conf array.
        // SAFETY: srv_conf is null or holds every stream module's srv conf for this block.
        let Some(srv) = (unsafe { module_conf::<SrvConf>(us.srv_conf, module()) }) else { continue };
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
        // SAFETY: cf->cycle is the cycle being configured.
        let hash_module = unsafe { find_module(cf.cycle, "ngx_stream_upstream_hash_module") };
        // SAFETY: the hash module's srv conf of this upstream is laid out as peers::HashSrvConf
        // (zeroed at creation) and lives as long as the cycle.
        let hcf = hash_module.and_then(|m| unsafe { module_conf::<peers::HashSrvConf>(us.srv_conf, m) });
        let (hash, consistent) = hcf.as_ref().map(|h| (!h.key.value.data.is_null(), !h.points.is_null())).unwrap_or((false, false));
        let Some(ring) = hash_ring(cf, &name, srv.hash_lb, hash, consistent, !us.shm_zone.is_null()) else {
            return NGX_ERROR as ngx_int_t;
        };
        srv.chash = if ring { hcf.map(ptr::NonNull::from) } else { None };
        srv.shares_failures = !us.shm_zone.is_null();
        srv.source = format!("{}{}", u.addresses[0], u.path);
        srv.key = crate::model::slot_key(&name, u);
        srv.original_init_peer = us.peer.init;
        us.peer.init = Some(peers::init_peer);
        srv.us = ptr::NonNull::new(uscf);
        main.upstreams.push(srv as *mut SrvConf);
    }
    // SAFETY: cf is postconfiguration's; main lives as long as the cycle.
    unsafe { add_zone_if_synced(cf, main) }
}

fn core_module() -> &'static ngx_module_t {
    // SAFETY: nginx's static module, only written while nginx loads modules.
    unsafe { &*ptr::addr_of!(ngx_stream_core_module) }
}

fn upstream_module() -> &'static ngx_module_t {
    // SAFETY: as above.
    unsafe { &*ptr::addr_of!(ngx_stream_upstream_module) }
}

/// The stream conf ctx of the block being parsed.
///
/// # Safety
/// `cf` is inside the stream{} block (a directive handler's or postconfiguration's).
unsafe fn conf_ctx(cf: &ngx_conf_t) -> Option<&'static ngx_stream_conf_ctx_t> {
    // SAFETY: contract: cf->ctx is an ngx_stream_conf_ctx_t of the cycle being configured.
    unsafe { cf.ctx.cast::<ngx_stream_conf_ctx_t>().as_ref() }
}

/// nginx's `stream` core module: its conf in a cycle is the stream{} block's conf ctx.
struct NgxStreamModule;

impl CoreModule for NgxStreamModule {
    fn module() -> &'static ngx_module_t {
        // SAFETY: nginx's static module, only written while nginx loads modules.
        unsafe { &*ptr::addr_of!(ngx_stream_module) }
    }
}

// SAFETY: the `stream` block's handler stores its ngx_stream_conf_ctx_t in the cycle's conf_ctx
// at the stream module's index (null when the configuration has no stream{} block).
unsafe impl CoreModuleMainConf for NgxStreamModule {
    type MainConf = ngx_stream_conf_ctx_t;
}

/// The stream conf ctx of a configured cycle (the stream{} block), if there is one.
///
/// # Safety
/// `cycle` null or a cycle whose configuration nginx has parsed; main thread.
unsafe fn cycle_conf_ctx(cycle: *mut ngx_cycle_t) -> Option<&'static ngx_stream_conf_ctx_t> {
    // SAFETY: contract.
    NgxStreamModule::main_conf(unsafe { cycle.as_ref() }?)
}

/// Our main conf in `cycle`, if its stream{} block exists and loads us.
///
/// # Safety
/// `cycle` null or a cycle whose configuration nginx has parsed; main thread.
unsafe fn main_conf_of(cycle: *mut ngx_cycle_t) -> Option<&'static mut MainConf> {
    // SAFETY: contract; the main_conf array of the stream ctx holds our MainConf.
    unsafe { cycle_conf_ctx(cycle).and_then(|ctx| module_conf(ctx.main_conf, module())) }
}

/// Every stream upstream of the running cycle (synced or not).
///
/// # Safety
/// Main thread only.
unsafe fn cycle_upstreams() -> &'static [*mut ngx_stream_upstream_srv_conf_t] {
    // SAFETY: ngx_cycle is the running cycle on the main thread; the upstream module's main conf
    // is an ngx_stream_upstream_main_conf_t.
    let umcf = unsafe {
        cycle_conf_ctx(ngx_cycle as *mut ngx_cycle_t)
            .and_then(|ctx| module_conf::<ngx_stream_upstream_main_conf_t>(ctx.main_conf, upstream_module()))
    };
    match umcf {
        // SAFETY: umcf->upstreams is an array of ngx_stream_upstream_srv_conf_t pointers.
        Some(umcf) => unsafe { umcf.upstreams.as_slice() },
        None => &[],
    }
}

/// Our srv conf of a stream upstream, if it has one (implicit upstreams have none).
///
/// # Safety
/// `us` must be a valid upstream conf.
unsafe fn srv_conf_of(us: *mut ngx_stream_upstream_srv_conf_t) -> Option<&'static mut SrvConf> {
    // SAFETY: contract; srv_conf is null or holds every stream module's srv conf of the block.
    unsafe { module_conf((*us).srv_conf, module()) }
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
