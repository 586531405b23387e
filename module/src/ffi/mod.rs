//! The FFI layer: everything that touches nginx. This is the only place with `unsafe` code in
//! the project; each block says why it is sound. Logic lives in the safe modules of the crate.
//!
//! - `mod.rs` (this file): the HTTP module's table, directives, configuration structs, postconfiguration.
//! - [`common`]: what the HTTP and the stream module share (main conf, directive handlers, panic guard).
//! - [`generation`]: building nginx round-robin peer lists from synced servers, swapping them per
//!   worker (the same source in the stream module); [`peers`]: its HTTP types and `peer.init`.
//! - [`shm`]: the shared zone (lease + one slot per synced upstream).
//! - [`worker`]: per-worker start/stop, the tick timer, leadership, the poller's wake-up socket.
//! - [`show`]: the `upstream_show` and `upsync_metrics` content handlers.
//! - [`log`]: `tracing` events into nginx's error log.
use core::ffi::{c_char, c_void};
use core::ptr;
use std::ffi::CStr;
use std::rc::Rc;

use ngx::core::{NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::ffi::*;
use ngx::http::{
    HttpModule, HttpModuleConfExt, HttpModuleLocationConf, HttpModuleMainConf, HttpModuleServerConf, Merge, MergeConfigError,
    NgxHttpCoreModule, NgxHttpUpstreamModule,
};
use ngx::{ngx_conf_log_error, ngx_string};

use crate::conf::{self, Lb, UpstreamSync};
pub(crate) use common::*;

mod addr;
mod common;
mod generation;
mod log;
mod peers;
mod shm;
mod show;
mod views;
mod worker;

/// The shared zone of the HTTP module (the stream module's is `upsync_stream`).
const ZONE_NAME: &str = "upsync";
/// How nginx's slab allocator names the zone in its messages.
const ZONE_LOG_CTX: &CStr = c" in upsync zone \"upsync\"";

/// The zone's tag: our module's address (stable across reloads: nginx keeps the module loaded).
fn zone_tag() -> *mut c_void {
    ptr::addr_of_mut!(ngx_http_upsync_module) as *mut c_void
}

/// Per-upstream-block configuration and, in workers, per-upstream runtime state.
#[derive(Default)]
pub struct SrvConf {
    pub sync: UpstreamSync,
    /// The upstream this conf belongs to (set in postconfiguration for synced upstreams).
    us: Option<ptr::NonNull<ngx_http_upstream_srv_conf_t>>,
    /// `us->peer.init` before we wrapped it (round robin, keepalive, least_conn...).
    original_init_peer: ngx_http_upstream_init_peer_pt,
    /// The slot in the shared zone and the zone's slab pool (set by the zone's init).
    slot: Option<ptr::NonNull<shm::Slot>>,
    shpool: Option<ptr::NonNull<ngx_slab_pool_t>>,
    /// Identifies the slot across reloads: upstream name + where it syncs from.
    key: u64,
    /// "http://127.0.0.1:8500/v1/kv/upstreams/app", for messages and upstream_show.
    source: String,
    /// Worker only: the slot version this worker's peers were built from.
    local_version: u64,
    /// Worker only: the peer list we built and installed in `us->peer.data` (None: nginx's own
    /// list from the config is still in use).
    current: Option<Rc<peers::Generation>>,
    /// Worker only: a large list being built on a builder thread.
    building: Option<peers::Pending>,
    /// `upsync_lb hash_ketama|hash_modula` (checked against nginx's `hash` in postconfiguration).
    hash_lb: Option<Lb>,
    /// With nginx's `hash KEY consistent;`: its per-upstream conf, whose ring every new list
    /// replaces.
    pub(crate) chash: Option<ptr::NonNull<peers::HashSrvConf>>,
    /// The upstream has `zone`: its servers' failure state is shared between workers
    /// ([`crate::fails`]).
    shares_failures: bool,
    /// Worker only: the shared failure table's epoch last copied onto `current`'s peers, and the
    /// servers it listed (their `fails` go back to 0 when they leave the table).
    fail_epoch_seen: u64,
    fail_applied: Vec<std::net::SocketAddr>,
}

impl Merge for SrvConf {
    fn merge(&mut self, _prev: &Self) -> Result<(), MergeConfigError> {
        Ok(())
    }
}

impl Merge for MainConf {
    fn merge(&mut self, _prev: &Self) -> Result<(), MergeConfigError> {
        Ok(())
    }
}

pub(crate) struct Module;

impl HttpModule for Module {
    fn module() -> &'static ngx_module_t {
        // SAFETY: the module static is initialised at compile time and only written by nginx
        // while it loads the module (index/ctx_index), before any call reaches us.
        unsafe { &*ptr::addr_of!(ngx_http_upsync_module) }
    }

    unsafe extern "C" fn postconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
        // SAFETY: nginx calls postconfiguration with a valid cf inside the http{} block.
        guard("postconfiguration", NGX_ERROR as ngx_int_t, || unsafe { postconfiguration(&mut *cf) })
    }
}

// SAFETY: the type registered for main/srv conf is the one create_*_conf allocate.
unsafe impl HttpModuleMainConf for Module {
    type MainConf = MainConf;
}
// SAFETY: as above.
unsafe impl HttpModuleServerConf for Module {
    type ServerConf = SrvConf;
}

static CTX: ngx_http_module_t = ngx_http_module_t {
    preconfiguration: None,
    postconfiguration: Some(Module::postconfiguration),
    create_main_conf: Some(Module::create_main_conf),
    init_main_conf: None,
    create_srv_conf: Some(Module::create_srv_conf),
    merge_srv_conf: Some(Module::merge_srv_conf),
    create_loc_conf: None,
    merge_loc_conf: None,
};

const UPS: ngx_uint_t = NGX_HTTP_UPS_CONF as ngx_uint_t;

static mut COMMANDS: [ngx_command_t; 12] = [
    command(ngx_string!("upsync"), UPS | NGX_CONF_1MORE as ngx_uint_t, set_upsync, NGX_HTTP_SRV_CONF_OFFSET),
    command(ngx_string!("upsync_dump_path"), UPS | NGX_CONF_TAKE1 as ngx_uint_t, set_dump_path, NGX_HTTP_SRV_CONF_OFFSET),
    command(ngx_string!("upsync_lb"), UPS | NGX_CONF_TAKE1 as ngx_uint_t, set_lb, NGX_HTTP_SRV_CONF_OFFSET),
    command(ngx_string!("upsync_token"), UPS | NGX_CONF_TAKE1 as ngx_uint_t, set_token, NGX_HTTP_SRV_CONF_OFFSET),
    command(ngx_string!("upsync_token_file"), UPS | NGX_CONF_TAKE1 as ngx_uint_t, set_token_file, NGX_HTTP_SRV_CONF_OFFSET),
    command(ngx_string!("upsync_tls"), UPS | NGX_CONF_1MORE as ngx_uint_t, set_tls, NGX_HTTP_SRV_CONF_OFFSET),
    command(ngx_string!("upsync_allow_empty"), UPS | NGX_CONF_FLAG as ngx_uint_t, set_allow_empty, NGX_HTTP_SRV_CONF_OFFSET),
    command(ngx_string!("upsync_shm_size"), (NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1) as ngx_uint_t, set_shm_size, NGX_HTTP_MAIN_CONF_OFFSET),
    command(
        ngx_string!("upsync_consul_connections"),
        (NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1) as ngx_uint_t,
        set_consul_connections,
        NGX_HTTP_MAIN_CONF_OFFSET,
    ),
    command(ngx_string!("upstream_show"), (NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS) as ngx_uint_t, set_show, 0),
    command(ngx_string!("upsync_metrics"), (NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS) as ngx_uint_t, set_metrics, 0),
    ngx_command_t::empty(),
];

ngx::ngx_modules!(ngx_http_upsync_module);

#[used]
#[allow(non_upper_case_globals)]
#[no_mangle]
pub static mut ngx_http_upsync_module: ngx_module_t = ngx_module_t {
    ctx: ptr::addr_of!(CTX) as _,
    // SAFETY: taking the address of a static; nginx reads the array, never frees it.
    commands: unsafe { ptr::addr_of_mut!(COMMANDS[0]) },
    type_: NGX_HTTP_MODULE as _,
    init_module: Some(worker::init_module),
    init_process: Some(worker::init_process),
    exit_process: Some(worker::exit_process),
    ..ngx_module_t::default()
};

/// `upsync_lb`: round robin is nginx's default; least_conn and ip_hash run nginx's own directive
/// of that name (found by name among the loaded modules), so balancing stays nginx's code.
extern "C" fn set_lb(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, conf: *mut c_void) -> *mut c_char {
    guard("\"upsync_lb\" directive", NGX_CONF_ERROR, || {
        // SAFETY: cf is valid during the handler.
        let lb = match unsafe { args(&*cf) }.and_then(|a| conf::parse_lb(a[0])) {
            Ok(lb) => lb,
            Err(e) => return conf_error(cf, "upsync_lb", &e),
        };
        let (module_name, directive) = match lb {
            Lb::RoundRobin => return NGX_CONF_OK,
            // The block's own `hash` directive does the balancing; checked in postconfiguration.
            Lb::HashKetama | Lb::HashModula => {
                // SAFETY: registered with NGX_HTTP_SRV_CONF_OFFSET: conf is our SrvConf.
                unsafe { (*(conf as *mut SrvConf)).hash_lb = Some(lb) };
                return NGX_CONF_OK;
            }
            Lb::LeastConn => ("ngx_http_upstream_least_conn_module", "least_conn"),
            Lb::IpHash => ("ngx_http_upstream_ip_hash_module", "ip_hash"),
        };
        // SAFETY: cf/conf are this directive handler's; nginx's least_conn and ip_hash take no
        // arguments and only use cf.
        unsafe { run_directive(cf, conf, module_name, directive) }
    })
}

extern "C" fn set_show(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, _conf: *mut c_void) -> *mut c_char {
    guard("\"upstream_show\" directive", NGX_CONF_ERROR, || set_location_handler(cf, show::handler))
}

extern "C" fn set_metrics(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, _conf: *mut c_void) -> *mut c_char {
    guard("\"upsync_metrics\" directive", NGX_CONF_ERROR, || set_location_handler(cf, show::metrics_handler))
}

/// Makes `handler` the content handler of the location being parsed (`upstream_show`,
/// `upsync_metrics`).
fn set_location_handler(cf: *mut ngx_conf_t, handler: unsafe extern "C" fn(*mut ngx_http_request_t) -> ngx_int_t) -> *mut c_char {
    // SAFETY: nginx passes a valid cf to directive handlers (registered for locations only).
    let clcf = NgxHttpCoreModule::location_conf_mut(unsafe { &*cf });
    match clcf {
        Some(clcf) => {
            clcf.handler = Some(handler);
            NGX_CONF_OK
        }
        None => NGX_CONF_ERROR,
    }
}

/// After the whole http{} block is parsed (and every upstream's balancer initialised): wrap the
/// peer init of each synced upstream and create the shared zone.
///
/// # Safety
/// `cf` must be the conf nginx passes to postconfiguration.
unsafe fn postconfiguration(cf: &mut ngx_conf_t) -> ngx_int_t {
    log::init();
    // In postconfiguration, cf->ctx is the http{} conf ctx with every module's main conf.
    let (Some(main), Some(umcf)) = (Module::main_conf_mut(&*cf), NgxHttpUpstreamModule::main_conf(&*cf)) else {
        ngx_conf_log_error!(NGX_LOG_EMERG, cf, "upsync: the http{{}} block has no upstream configuration");
        return NGX_ERROR as ngx_int_t;
    };
    // SAFETY: umcf->upstreams is an array of ngx_http_upstream_srv_conf_t pointers.
    let upstreams: &[*mut ngx_http_upstream_srv_conf_t] = unsafe { umcf.upstreams.as_slice() };
    for &uscf in upstreams {
        // SAFETY: every element is a valid upstream conf of this cycle.
        let us = unsafe { &mut *uscf };
        // Implicit upstreams (proxy_pass http://ADDR) have no srv_conf array and cannot carry our
        // directives.
        let Some(srv) = Module::server_conf_mut(us) else { continue };
        let name = String::from_utf8_lossy(us.host.as_bytes()).into_owned();
        if let Err(e) = conf::validate_block(&srv.sync) {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "upsync: upstream \"{}\": {}", name, e);
            return NGX_ERROR as ngx_int_t;
        }
        let Some(u) = &srv.sync.upsync else { continue };
        // nginx >= 1.27.3 resolves `server NAME resolve;` itself and edits the peers it made
        // from it: never in a list upsync replaces.
        #[cfg(all(nginx1_27_3, ngx_feature = "http_upstream_zone"))]
        // SAFETY: us is a configured upstream block; servers is its array of servers.
        if let Some(server) = unsafe { resolve_server(us) } {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "upsync: {}", conf::resolve_refusal(&name, &server));
            return NGX_ERROR as ngx_int_t;
        }
        if us.peer.init.is_none() {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "upsync: upstream \"{}\" has no balancer initialised", name);
            return NGX_ERROR as ngx_int_t;
        }
        // nginx's `hash` in this block: its conf says whether there is one (a key) and whether it
        // is consistent (its init built a ring, before postconfiguration).
        // SAFETY: cf->cycle is the cycle being configured.
        let hash_module = unsafe { find_module(cf.cycle, "ngx_http_upstream_hash_module") };
        // SAFETY: the hash module's srv conf of this upstream is a HashSrvConf (zeroed at creation).
        let hcf = hash_module.and_then(|m| unsafe { us.http_server_conf_unchecked::<peers::HashSrvConf>(m) });
        // SAFETY: as above; nginx owns it for the life of the cycle.
        let (hash, consistent) =
            hcf.map(|h| unsafe { h.as_ref() }).map(|h| (!h.key.value.data.is_null(), !h.points.is_null())).unwrap_or((false, false));
        let Some(ring) = hash_ring(cf, &name, srv.hash_lb, hash, consistent, !us.shm_zone.is_null()) else {
            return NGX_ERROR as ngx_int_t;
        };
        srv.chash = if ring { hcf } else { None };
        srv.source = format!("{}{}", u.addresses[0], u.path);
        srv.key = crate::model::slot_key(&name, u);
        srv.original_init_peer = us.peer.init;
        srv.shares_failures = !us.shm_zone.is_null();
        us.peer.init = Some(peers::init_peer);
        srv.us = ptr::NonNull::new(uscf);
        main.upstreams.push(srv as *mut SrvConf);
    }
    // SAFETY: cf is postconfiguration's; main lives as long as the cycle.
    unsafe { add_zone_if_synced(cf, main) }
}

/// The first server of the block with nginx's own `resolve` (nginx >= 1.27.3: a server whose
/// name is resolved at run time keeps that name in `host`), as written in the config.
///
/// # Safety
/// `us` is an upstream block of the cycle being configured.
#[cfg(all(nginx1_27_3, ngx_feature = "http_upstream_zone"))]
unsafe fn resolve_server(us: &ngx_http_upstream_srv_conf_t) -> Option<String> {
    if us.servers.is_null() {
        return None;
    }
    // SAFETY: contract; `servers` is an array of ngx_http_upstream_server_t.
    let servers: &[ngx_http_upstream_server_t] = unsafe { (*us.servers).as_slice() };
    servers.iter().find(|s| s.host.len != 0).map(|s| String::from_utf8_lossy(s.name.as_bytes()).into_owned())
}

/// Our main conf in `cycle`, if its http{} block exists and loads us.
///
/// # Safety
/// `cycle` null or a cycle whose configuration nginx has parsed; main thread.
unsafe fn main_conf_of(cycle: *mut ngx_cycle_t) -> Option<&'static mut MainConf> {
    // SAFETY: contract.
    let cycle = unsafe { cycle.as_ref() }?;
    // ngx's lookup indexes conf_ctx without checking it (null before the first configuration).
    if cycle.conf_ctx.is_null() {
        return None;
    }
    Module::main_conf_mut(cycle)
}

/// Every upstream of the running cycle (synced or not).
///
/// # Safety
/// Main thread only.
unsafe fn cycle_upstreams() -> &'static [*mut ngx_http_upstream_srv_conf_t] {
    // SAFETY: ngx_cycle is the running cycle on the main thread (or null before the first).
    let Some(cycle) = (unsafe { (ngx_cycle as *const ngx_cycle_t).as_ref() }) else { return &[] };
    if cycle.conf_ctx.is_null() {
        return &[];
    }
    match NgxHttpUpstreamModule::main_conf(cycle) {
        // SAFETY: umcf->upstreams is an array of ngx_http_upstream_srv_conf_t pointers.
        Some(umcf) => unsafe { umcf.upstreams.as_slice() },
        None => &[],
    }
}

/// Our srv conf of an upstream, if it has one (implicit upstreams have none).
///
/// # Safety
/// `us` must be a valid upstream conf.
unsafe fn srv_conf_of(us: *mut ngx_http_upstream_srv_conf_t) -> Option<&'static mut SrvConf> {
    // SAFETY: contract.
    Module::server_conf_mut(unsafe { &*us })
}
