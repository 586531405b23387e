//! The FFI layer: everything that touches nginx. This is the only place with `unsafe` code in
//! the project; each block says why it is sound. Logic lives in the safe modules of the crate.
//!
//! - `mod.rs` (this file): the module table, directives, configuration structs, postconfiguration.
//! - [`peers`]: building nginx round-robin peer lists from synced servers, swapping them per worker.
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
use ngx::http::{HttpModule, HttpModuleMainConf, HttpModuleServerConf, Merge, MergeConfigError};
use ngx::{ngx_conf_log_error, ngx_string};

use crate::conf::{self, Lb, Token, UpstreamSync};

mod log;
mod peers;
mod shm;
mod show;
mod worker;

/// Default size of the shared zone. nginx maps it once; untouched pages cost no memory.
const DEFAULT_SHM_SIZE: usize = 32 << 20;
/// Room for the zone's header (lease, table of workers) and a few small lists.
const MIN_SHM_SIZE: usize = 64 << 10;

/// http{}-level configuration.
pub struct MainConf {
    /// `upsync_shm_size`.
    shm_size: Option<usize>,
    /// `upsync_consul_connections`.
    pub(crate) consul_connections: Option<usize>,
    /// The synced upstreams of this configuration (their srv confs), in config order.
    upstreams: Vec<*mut SrvConf>,
    /// The shared zone (created in postconfiguration when at least one upstream is synced).
    shm_zone: *mut ngx_shm_zone_t,
    /// Set by the zone's init (in the master, before the workers fork).
    header: *mut shm::Header,
    /// The config generation this configuration got from the zone.
    generation: u64,
}

impl Default for MainConf {
    fn default() -> Self {
        MainConf {
            shm_size: None,
            consul_connections: None,
            upstreams: Vec::new(),
            shm_zone: ptr::null_mut(),
            header: ptr::null_mut(),
            generation: 0,
        }
    }
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

const fn command(
    name: ngx_str_t,
    type_: ngx_uint_t,
    set: unsafe extern "C" fn(*mut ngx_conf_t, *mut ngx_command_t, *mut c_void) -> *mut c_char,
    conf: usize,
) -> ngx_command_t {
    ngx_command_t { name, type_, set: Some(set), conf, offset: 0, post: ptr::null_mut() }
}

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

/// The directive's arguments after its name, as UTF-8.
///
/// # Safety
/// `cf` must be the `ngx_conf_t` nginx passed to a directive handler.
unsafe fn args(cf: &ngx_conf_t) -> Result<Vec<&str>, String> {
    // SAFETY: during a directive handler cf->args is an array of ngx_str_t, element 0 the name.
    let all: &[ngx_str_t] = unsafe { (*cf.args).as_slice() };
    all.iter()
        .skip(1)
        .map(|s| {
            let bytes = s.as_bytes();
            std::str::from_utf8(bytes).map_err(|_| format!("argument \"{}\" is not valid UTF-8", String::from_utf8_lossy(bytes)))
        })
        .collect()
}

/// Logs `msg` as the directive's error (nginx appends " in FILE:LINE") and fails the config.
fn conf_error(cf: *mut ngx_conf_t, directive: &str, msg: &str) -> *mut c_char {
    ngx_conf_log_error!(NGX_LOG_EMERG, cf, "\"{}\" directive: {}", directive, msg);
    NGX_CONF_ERROR
}

/// Runs a directive handler body on the srv conf with its arguments; maps `Err` to nginx's error.
///
/// # Safety
/// `cf` and `conf` must be what nginx passed to a handler registered with
/// `NGX_HTTP_SRV_CONF_OFFSET` (so `conf` is our `SrvConf`).
unsafe fn with_srv_conf(
    cf: *mut ngx_conf_t,
    conf: *mut c_void,
    directive: &str,
    f: impl FnOnce(&mut SrvConf, &[&str]) -> Result<(), String>,
) -> *mut c_char {
    // SAFETY: see the function's contract.
    let (cfr, srv) = unsafe { (&*cf, &mut *(conf as *mut SrvConf)) };
    // SAFETY: cfr is a directive handler's cf.
    let result = guard(directive, Err("failed unexpectedly (see the error log)".into()), || unsafe { args(cfr) }.and_then(|a| f(srv, &a)));
    match result {
        Ok(()) => NGX_CONF_OK,
        Err(e) => conf_error(cf, directive, &e),
    }
}

extern "C" fn set_upsync(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, conf: *mut c_void) -> *mut c_char {
    // SAFETY: registered with NGX_HTTP_SRV_CONF_OFFSET in an upstream block.
    unsafe {
        with_srv_conf(cf, conf, "upsync", |srv, a| {
            if srv.sync.upsync.is_some() {
                return Err("is duplicate (one upsync line per upstream block)".into());
            }
            srv.sync.upsync = Some(conf::parse_upsync(a)?);
            Ok(())
        })
    }
}

extern "C" fn set_dump_path(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, conf: *mut c_void) -> *mut c_char {
    // SAFETY: cf is valid; relative paths are resolved against nginx's prefix like nginx does.
    let full = unsafe { full_name_of_arg(cf) };
    // SAFETY: registered with NGX_HTTP_SRV_CONF_OFFSET in an upstream block.
    unsafe {
        with_srv_conf(cf, conf, "upsync_dump_path", |srv, _| {
            if srv.sync.dump_path.is_some() {
                return Err("is duplicate".into());
            }
            srv.sync.dump_path = Some(full?.into());
            Ok(())
        })
    }
}

extern "C" fn set_token(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, conf: *mut c_void) -> *mut c_char {
    // SAFETY: registered with NGX_HTTP_SRV_CONF_OFFSET in an upstream block.
    unsafe {
        with_srv_conf(cf, conf, "upsync_token", |srv, a| {
            if srv.sync.token.is_some() {
                return Err("is duplicate (use either upsync_token or upsync_token_file)".into());
            }
            if a[0].is_empty() || a[0].chars().any(|c| c.is_control() || c == ' ') {
                return Err("the token is empty or has spaces/control characters".into());
            }
            srv.sync.token = Some(Token::Value(a[0].to_string()));
            Ok(())
        })
    }
}

extern "C" fn set_token_file(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, conf: *mut c_void) -> *mut c_char {
    // SAFETY: cf is valid.
    let full = unsafe { full_name_of_arg(cf) };
    // SAFETY: registered with NGX_HTTP_SRV_CONF_OFFSET in an upstream block.
    unsafe {
        with_srv_conf(cf, conf, "upsync_token_file", |srv, _| {
            if srv.sync.token.is_some() {
                return Err("is duplicate (use either upsync_token or upsync_token_file)".into());
            }
            let path = full?;
            // Read now so a missing or unreadable file fails `nginx -t`, not the first poll.
            let token = std::fs::read_to_string(&path).map_err(|e| format!("cannot read the token file \"{path}\": {e}"))?;
            if token.trim().is_empty() {
                return Err(format!("the token file \"{path}\" is empty"));
            }
            srv.sync.token = Some(Token::File(path.into()));
            Ok(())
        })
    }
}

extern "C" fn set_tls(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, conf: *mut c_void) -> *mut c_char {
    // SAFETY: registered with NGX_HTTP_SRV_CONF_OFFSET in an upstream block.
    unsafe {
        with_srv_conf(cf, conf, "upsync_tls", |srv, a| {
            if srv.sync.tls.is_some() {
                return Err("is duplicate".into());
            }
            let tls = conf::parse_tls(a)?;
            for p in [&tls.ca_file, &tls.cert_file, &tls.key_file].into_iter().flatten() {
                std::fs::metadata(p).map_err(|e| format!("cannot read \"{}\": {e}", p.display()))?;
            }
            srv.sync.tls = Some(tls);
            Ok(())
        })
    }
}

extern "C" fn set_allow_empty(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, conf: *mut c_void) -> *mut c_char {
    // SAFETY: registered with NGX_HTTP_SRV_CONF_OFFSET in an upstream block.
    unsafe {
        with_srv_conf(cf, conf, "upsync_allow_empty", |srv, a| {
            srv.sync.allow_empty = conf::parse_on_off(a[0])?;
            Ok(())
        })
    }
}

extern "C" fn set_shm_size(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, conf: *mut c_void) -> *mut c_char {
    guard("\"upsync_shm_size\" directive", NGX_CONF_ERROR, || {
        // SAFETY: registered with NGX_HTTP_MAIN_CONF_OFFSET: conf is our MainConf; cf is valid.
        let (main, a) = unsafe { (&mut *(conf as *mut MainConf), args(&*cf)) };
        let r = a.and_then(|a| {
            let size = conf::parse_size(a[0])?;
            if size < MIN_SHM_SIZE {
                return Err(format!("\"{}\" is too small: use at least 64k", a[0]));
            }
            main.shm_size = Some(size);
            Ok(())
        });
        match r {
            Ok(()) => NGX_CONF_OK,
            Err(e) => conf_error(cf, "upsync_shm_size", &e),
        }
    })
}

extern "C" fn set_consul_connections(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, conf: *mut c_void) -> *mut c_char {
    guard("\"upsync_consul_connections\" directive", NGX_CONF_ERROR, || {
        // SAFETY: registered with NGX_HTTP_MAIN_CONF_OFFSET: conf is our MainConf; cf is valid.
        let (main, a) = unsafe { (&mut *(conf as *mut MainConf), args(&*cf)) };
        match a.and_then(|a| conf::parse_connections(a[0])) {
            Ok(n) => {
                main.consul_connections = Some(n);
                NGX_CONF_OK
            }
            Err(e) => conf_error(cf, "upsync_consul_connections", &e),
        }
    })
}

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
        // SAFETY: cf->cycle->modules is the NULL-terminated module list of the cycle being
        // configured; each module's commands array ends with an entry whose name.len is 0. The
        // handlers of least_conn/ip_hash take no arguments and only use cf (they ignore conf).
        unsafe {
            if let Some(module) = find_module((*cf).cycle, module_name) {
                let mut c = module.commands;
                while !c.is_null() && (*c).name.len != 0 {
                    if (*c).name.as_bytes() == directive.as_bytes() {
                        return match (*c).set {
                            Some(set) => set(cf, c, conf),
                            None => break,
                        };
                    }
                    c = c.add(1);
                }
            }
        }
        conf_error(cf, "upsync_lb", &format!("nginx has no \"{directive}\" directive ({module_name} is not built in)"))
    })
}

/// The module called `name` among `cycle`'s modules (static and loaded).
///
/// # Safety
/// `cycle` is a cycle being configured or running, whose `modules` is its NULL-terminated list.
unsafe fn find_module(cycle: *mut ngx_cycle_t, name: &str) -> Option<&'static ngx_module_t> {
    // SAFETY: contract; every module lives as long as the process (static or loaded .so).
    unsafe {
        let mut m = (*cycle).modules;
        while !(*m).is_null() {
            let module = &**m;
            if !module.name.is_null() && CStr::from_ptr(module.name).to_bytes() == name.as_bytes() {
                return Some(module);
            }
            m = m.add(1);
        }
    }
    None
}

extern "C" fn set_show(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, _conf: *mut c_void) -> *mut c_char {
    guard("\"upstream_show\" directive", NGX_CONF_ERROR, || {
        // SAFETY: in a location block, the core module's loc conf is an ngx_http_core_loc_conf_t.
        unsafe {
            let ctx = (*cf).ctx as *mut ngx_http_conf_ctx_t;
            let clcf = *(*ctx).loc_conf.add(ngx_http_core_module.ctx_index) as *mut ngx_http_core_loc_conf_t;
            (*clcf).handler = Some(show::handler);
        }
        NGX_CONF_OK
    })
}

extern "C" fn set_metrics(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, _conf: *mut c_void) -> *mut c_char {
    guard("\"upsync_metrics\" directive", NGX_CONF_ERROR, || {
        // SAFETY: in a location block, the core module's loc conf is an ngx_http_core_loc_conf_t.
        unsafe {
            let ctx = (*cf).ctx as *mut ngx_http_conf_ctx_t;
            let clcf = *(*ctx).loc_conf.add(ngx_http_core_module.ctx_index) as *mut ngx_http_core_loc_conf_t;
            (*clcf).handler = Some(show::metrics_handler);
        }
        NGX_CONF_OK
    })
}

/// The first argument as an absolute path (relative to nginx's prefix, as nginx does for paths).
///
/// # Safety
/// `cf` must be a directive handler's cf with at least one argument.
unsafe fn full_name_of_arg(cf: *mut ngx_conf_t) -> Result<String, String> {
    // SAFETY: contract above; ngx_conf_full_name rewrites the ngx_str_t in place with memory
    // from cf->pool.
    unsafe {
        let arg = ((*(*cf).args).elts as *mut ngx_str_t).add(1);
        if ngx_conf_full_name((*cf).cycle, arg, 0) != NGX_OK as ngx_int_t {
            return Err("cannot make an absolute path".into());
        }
        std::str::from_utf8((*arg).as_bytes()).map(str::to_string).map_err(|_| "the path is not valid UTF-8".into())
    }
}

/// After the whole http{} block is parsed (and every upstream's balancer initialised): wrap the
/// peer init of each synced upstream and create the shared zone.
///
/// # Safety
/// `cf` must be the conf nginx passes to postconfiguration.
unsafe fn postconfiguration(cf: &mut ngx_conf_t) -> ngx_int_t {
    log::init();
    // SAFETY: in postconfiguration, cf->ctx is the http{} conf ctx with every module's main conf.
    let (main, umcf) = unsafe {
        let ctx = cf.ctx as *mut ngx_http_conf_ctx_t;
        let main = &mut *(*(*ctx).main_conf.add(Module::module().ctx_index) as *mut MainConf);
        let umcf = &mut *(*(*ctx).main_conf.add(ngx_http_upstream_module.ctx_index) as *mut ngx_http_upstream_main_conf_t);
        (main, umcf)
    };
    // SAFETY: umcf->upstreams is an array of ngx_http_upstream_srv_conf_t pointers.
    let upstreams: &[*mut ngx_http_upstream_srv_conf_t] = unsafe { umcf.upstreams.as_slice() };
    for &uscf in upstreams {
        // SAFETY: every element is a valid upstream conf of this cycle. Implicit upstreams
        // (proxy_pass http://ADDR) have no srv_conf array and cannot carry our directives.
        let us = unsafe { &mut *uscf };
        if us.srv_conf.is_null() {
            continue;
        }
        // SAFETY: srv_conf holds every HTTP module's srv conf for this upstream block.
        let srv = unsafe { &mut *(*us.srv_conf.add(Module::module().ctx_index) as *mut SrvConf) };
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
            ngx_conf_log_error!(
                NGX_LOG_EMERG,
                cf,
                "upsync: upstream \"{}\": server \"{}\" has \"resolve\": nginx's resolver would keep editing peers of \
                 a list upsync replaces with the one from Consul; remove \"resolve\" (and \"service=\") from the \
                 servers of this upstream, or move that server to an upstream without upsync",
                name,
                server
            );
            return NGX_ERROR as ngx_int_t;
        }
        if us.peer.init.is_none() {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "upsync: upstream \"{}\" has no balancer initialised", name);
            return NGX_ERROR as ngx_int_t;
        }
        // nginx's `hash` in this block: its conf says whether there is one (a key) and whether it
        // is consistent (its init built a ring, before postconfiguration).
        // SAFETY: cf->cycle is the cycle being configured; the hash module's srv conf of this
        // upstream is a HashSrvConf (zeroed at creation).
        let hcf = unsafe {
            find_module(cf.cycle, "ngx_http_upstream_hash_module")
                .map(|m| *us.srv_conf.add(m.ctx_index) as *mut peers::HashSrvConf)
                .filter(|h| !h.is_null())
        };
        // SAFETY: as above.
        let (hash, consistent) = hcf.map(|h| unsafe { (!(*h).key.value.data.is_null(), !(*h).points.is_null()) }).unwrap_or((false, false));
        // nginx >= 1.27.3 builds no ring at configuration time in an upstream with `zone` (it
        // builds one on the first request), so there `hash KEY` and `hash KEY consistent` look
        // the same here: install our ring in any case (a plain `hash` never reads it) and take
        // upsync_lb's word for which of the two it is.
        #[cfg(all(nginx1_27_3, ngx_feature = "http_upstream_zone"))]
        let ring_unknown = hash && !consistent && !us.shm_zone.is_null();
        #[cfg(not(all(nginx1_27_3, ngx_feature = "http_upstream_zone")))]
        let ring_unknown = false;
        let consistent_checked = if ring_unknown { srv.hash_lb == Some(Lb::HashKetama) } else { consistent };
        if let Err(e) = conf::check_hash_lb(srv.hash_lb, hash, consistent_checked) {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "upsync: upstream \"{}\": {}", name, e);
            return NGX_ERROR as ngx_int_t;
        }
        srv.chash = if consistent || ring_unknown { hcf.and_then(ptr::NonNull::new) } else { None };
        srv.source = format!("{}{}", u.addresses[0], u.path);
        srv.key = crate::model::slot_key(&name, u);
        srv.original_init_peer = us.peer.init;
        srv.shares_failures = !us.shm_zone.is_null();
        us.peer.init = Some(peers::init_peer);
        srv.us = ptr::NonNull::new(uscf);
        main.upstreams.push(srv as *mut SrvConf);
    }
    if main.upstreams.is_empty() {
        return NGX_OK as ngx_int_t;
    }
    let size = main.shm_size.unwrap_or(DEFAULT_SHM_SIZE);
    // SAFETY: cf is valid; the zone name is a static string; the tag is our module's address.
    match unsafe { shm::add_zone(cf, main, size) } {
        Ok(()) => NGX_OK as ngx_int_t,
        Err(e) => {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "upsync: {}", e);
            NGX_ERROR as ngx_int_t
        }
    }
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

/// The main conf of the running cycle, if the http{} block exists and loads us.
///
/// # Safety
/// Call only from the main thread of a worker or the master (reads ngx_cycle).
unsafe fn cycle_main_conf() -> Option<&'static mut MainConf> {
    // SAFETY: ngx_cycle is valid on the main thread.
    unsafe { main_conf_of(ngx_cycle as *mut ngx_cycle_t) }
}

/// Our main conf in `cycle`, if its http{} block exists and loads us.
///
/// # Safety
/// `cycle` null or a cycle whose configuration nginx has parsed; main thread.
unsafe fn main_conf_of(cycle: *mut ngx_cycle_t) -> Option<&'static mut MainConf> {
    // SAFETY: contract; conf_ctx holds the http conf ctx at the http module's index.
    unsafe {
        if cycle.is_null() || (*cycle).conf_ctx.is_null() {
            return None;
        }
        let http = *(*cycle).conf_ctx.add(ngx_http_module.index) as *mut ngx_http_conf_ctx_t;
        if http.is_null() {
            return None;
        }
        let main = *(*http).main_conf.add(Module::module().ctx_index) as *mut MainConf;
        main.as_mut()
    }
}

/// Runs the body of an entry point nginx calls (`extern "C"`): a panic must never unwind into
/// nginx's C frames (undefined behaviour). It is caught here, logged with what was running,
/// and `fallback` returned (an error code, or nothing). The crate keeps `panic = "unwind"` so
/// that the poller thread can restart a watch task that panicked instead of losing the worker.
pub(crate) fn guard<T>(what: &str, fallback: T, body: impl FnOnce() -> T) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(v) => v,
        Err(p) => {
            let msg = crate::poller::panic_message(p);
            tracing::error!("upsync: {what} panicked ({msg}); nginx goes on without it (please report this as a bug)");
            fallback
        }
    }
}

/// The upstream main conf of the running cycle (every upstream, synced or not).
///
/// # Safety
/// Main thread only.
unsafe fn cycle_upstreams() -> &'static [*mut ngx_http_upstream_srv_conf_t] {
    // SAFETY: as cycle_main_conf.
    unsafe {
        let cycle = ngx_cycle;
        if cycle.is_null() {
            return &[];
        }
        let http = *(*cycle).conf_ctx.add(ngx_http_module.index) as *mut ngx_http_conf_ctx_t;
        if http.is_null() {
            return &[];
        }
        let umcf = *(*http).main_conf.add(ngx_http_upstream_module.ctx_index) as *mut ngx_http_upstream_main_conf_t;
        if umcf.is_null() {
            return &[];
        }
        (*umcf).upstreams.as_slice()
    }
}

/// Our srv conf of an upstream, if it has one.
///
/// # Safety
/// `us` must be a valid upstream conf.
unsafe fn srv_conf_of(us: *mut ngx_http_upstream_srv_conf_t) -> Option<&'static mut SrvConf> {
    // SAFETY: contract above; srv_conf may be NULL for implicit upstreams.
    unsafe {
        if (*us).srv_conf.is_null() {
            return None;
        }
        (*(*us).srv_conf.add(Module::module().ctx_index) as *mut SrvConf).as_mut()
    }
}
