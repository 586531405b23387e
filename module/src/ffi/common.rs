//! What the HTTP and the stream module share in their nginx glue: the main configuration, the
//! handlers of the directives that read the same arguments in both (`upsync`, `upsync_dump_path`,
//! `upsync_token`, `upsync_token_file`, `upsync_tls`, `upsync_allow_empty`, `upsync_shm_size`,
//! `upsync_consul_connections`) and the panic guard of every entry point.
//!
//! Each glue (`ffi/mod.rs` for HTTP, `ffi/stream/mod.rs` for stream) defines its own `SrvConf`
//! with the fields used here (`sync`), and this file, [`super::shm`], [`super::worker`] and
//! [`super::log`] are compiled into each module against that glue's types.
use core::ffi::{c_char, c_void};
use core::ptr;
use std::ffi::CStr;

use ngx::core::{NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::ffi::*;
use ngx::ngx_conf_log_error;

use super::{shm, SrvConf};
use crate::conf::{self, Lb, Token};

/// Default size of the shared zone. nginx maps it once; untouched pages cost no memory.
pub(crate) const DEFAULT_SHM_SIZE: usize = 32 << 20;
/// Room for the zone's header (lease, table of workers) and a few small lists.
const MIN_SHM_SIZE: usize = 64 << 10;

/// Main-level configuration (`http{}` or `stream{}`), the same for both modules.
pub struct MainConf {
    /// `upsync_shm_size`.
    pub(crate) shm_size: Option<usize>,
    /// `upsync_consul_connections`.
    pub(crate) consul_connections: Option<usize>,
    /// The synced upstreams of this configuration (their srv confs), in config order.
    pub(crate) upstreams: Vec<*mut SrvConf>,
    /// The shared zone (created in postconfiguration when at least one upstream is synced).
    pub(crate) shm_zone: *mut ngx_shm_zone_t,
    /// Set by the zone's init (in the master, before the workers fork).
    pub(crate) header: *mut shm::Header,
    /// The config generation this configuration got from the zone.
    pub(crate) generation: u64,
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

/// The directive's arguments after its name, as UTF-8.
///
/// # Safety
/// `cf` must be the `ngx_conf_t` nginx passed to a directive handler.
pub(crate) unsafe fn args(cf: &ngx_conf_t) -> Result<Vec<&str>, String> {
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
pub(crate) fn conf_error(cf: *mut ngx_conf_t, directive: &str, msg: &str) -> *mut c_char {
    ngx_conf_log_error!(NGX_LOG_EMERG, cf, "\"{}\" directive: {}", directive, msg);
    NGX_CONF_ERROR
}

/// Runs a directive handler body on the srv conf with its arguments; maps `Err` to nginx's error.
///
/// # Safety
/// `cf` and `conf` must be what nginx passed to a handler registered with
/// the srv conf offset (so `conf` is our `SrvConf`).
pub(crate) unsafe fn with_srv_conf(
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

pub(crate) extern "C" fn set_upsync(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, conf: *mut c_void) -> *mut c_char {
    let set = |srv: &mut SrvConf, a: &[&str]| -> Result<(), String> {
        if srv.sync.upsync.is_some() {
            return Err("is duplicate (one upsync line per upstream block)".into());
        }
        srv.sync.upsync = Some(conf::parse_upsync(a)?);
        Ok(())
    };
    // SAFETY: registered with the srv conf offset in an upstream block.
    unsafe { with_srv_conf(cf, conf, "upsync", set) }
}

pub(crate) extern "C" fn set_dump_path(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, conf: *mut c_void) -> *mut c_char {
    // SAFETY: cf is valid; relative paths are resolved against nginx's prefix like nginx does.
    let full = unsafe { full_name_of_arg(cf) };
    let set = |srv: &mut SrvConf, _: &[&str]| -> Result<(), String> {
        if srv.sync.dump_path.is_some() {
            return Err("is duplicate".into());
        }
        srv.sync.dump_path = Some(full?.into());
        Ok(())
    };
    // SAFETY: registered with the srv conf offset in an upstream block.
    unsafe { with_srv_conf(cf, conf, "upsync_dump_path", set) }
}

pub(crate) extern "C" fn set_token(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, conf: *mut c_void) -> *mut c_char {
    let set = |srv: &mut SrvConf, a: &[&str]| -> Result<(), String> {
        if srv.sync.token.is_some() {
            return Err("is duplicate (use either upsync_token or upsync_token_file)".into());
        }
        if a[0].is_empty() || a[0].chars().any(|c| c.is_control() || c == ' ') {
            return Err("the token is empty or has spaces/control characters".into());
        }
        srv.sync.token = Some(Token::Value(a[0].to_string()));
        Ok(())
    };
    // SAFETY: registered with the srv conf offset in an upstream block.
    unsafe { with_srv_conf(cf, conf, "upsync_token", set) }
}

pub(crate) extern "C" fn set_token_file(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, conf: *mut c_void) -> *mut c_char {
    // SAFETY: cf is valid.
    let full = unsafe { full_name_of_arg(cf) };
    let set = |srv: &mut SrvConf, _: &[&str]| -> Result<(), String> {
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
    };
    // SAFETY: registered with the srv conf offset in an upstream block.
    unsafe { with_srv_conf(cf, conf, "upsync_token_file", set) }
}

pub(crate) extern "C" fn set_tls(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, conf: *mut c_void) -> *mut c_char {
    let set = |srv: &mut SrvConf, a: &[&str]| -> Result<(), String> {
        if srv.sync.tls.is_some() {
            return Err("is duplicate".into());
        }
        let tls = conf::parse_tls(a)?;
        for p in [&tls.ca_file, &tls.cert_file, &tls.key_file].into_iter().flatten() {
            std::fs::metadata(p).map_err(|e| format!("cannot read \"{}\": {e}", p.display()))?;
        }
        srv.sync.tls = Some(tls);
        Ok(())
    };
    // SAFETY: registered with the srv conf offset in an upstream block.
    unsafe { with_srv_conf(cf, conf, "upsync_tls", set) }
}

pub(crate) extern "C" fn set_allow_empty(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, conf: *mut c_void) -> *mut c_char {
    let set = |srv: &mut SrvConf, a: &[&str]| -> Result<(), String> {
        srv.sync.allow_empty = conf::parse_on_off(a[0])?;
        Ok(())
    };
    // SAFETY: registered with the srv conf offset in an upstream block.
    unsafe { with_srv_conf(cf, conf, "upsync_allow_empty", set) }
}

pub(crate) extern "C" fn set_shm_size(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, conf: *mut c_void) -> *mut c_char {
    guard("\"upsync_shm_size\" directive", NGX_CONF_ERROR, || {
        // SAFETY: registered with the main conf offset: conf is our MainConf; cf is valid.
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

pub(crate) extern "C" fn set_consul_connections(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, conf: *mut c_void) -> *mut c_char {
    guard("\"upsync_consul_connections\" directive", NGX_CONF_ERROR, || {
        // SAFETY: registered with the main conf offset: conf is our MainConf; cf is valid.
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

/// The module called `name` among `cycle`'s modules (static and loaded).
///
/// # Safety
/// `cycle` is a cycle being configured or running, whose `modules` is its NULL-terminated list.
pub(crate) unsafe fn find_module(cycle: *mut ngx_cycle_t, name: &str) -> Option<&'static ngx_module_t> {
    // SAFETY: contract: `modules` is a NULL-terminated array of modules that live as long as the
    // process (static, or in a loaded .so nginx never unloads while it runs).
    let modules: &[*mut ngx_module_t] = unsafe { null_terminated((*cycle).modules) };
    modules
        .iter()
        .map(|&m| {
            // SAFETY: every entry before the terminator is a valid module (see above).
            unsafe { &*m }
        })
        .find(|m| {
            // SAFETY: a module's name, when set, is a NUL-terminated static string.
            !m.name.is_null() && unsafe { CStr::from_ptr(m.name) }.to_bytes() == name.as_bytes()
        })
}

/// The entries of a NULL-terminated array of pointers (nginx's module lists), without the NULL.
///
/// # Safety
/// `p` points to an array of pointers that ends with a NULL entry and outlives the cycle.
unsafe fn null_terminated<T>(p: *mut *mut T) -> &'static [*mut T] {
    let mut n = 0;
    // SAFETY: contract: every entry up to and including the terminator is readable.
    while !unsafe { *p.add(n) }.is_null() {
        n += 1;
    }
    // SAFETY: the `n` entries before the terminator, read above.
    unsafe { std::slice::from_raw_parts(p, n) }
}

/// Runs nginx's own directive `directive` of module `module_name` (found among the loaded
/// modules, e.g. `least_conn`) with the current arguments, so balancing stays nginx's code.
///
/// # Safety
/// `cf`/`conf` are what nginx passed to a directive handler; the directive takes no arguments
/// and only uses `cf` (like nginx's `least_conn` and `ip_hash`).
pub(crate) unsafe fn run_directive(cf: *mut ngx_conf_t, conf: *mut c_void, module_name: &str, directive: &str) -> *mut c_char {
    // SAFETY: cf is the directive handler's, whose cycle is being configured.
    let module = unsafe { find_module((*cf).cycle, module_name) };
    let command = module.and_then(|m| {
        // SAFETY: a module's `commands` is null or an array ending with an entry whose name.len is 0.
        let commands = unsafe { commands_of(m) };
        commands.iter().find(|c| c.name.as_bytes() == directive.as_bytes())
    });
    if let Some(c) = command {
        if let Some(set) = c.set {
            // SAFETY: contract: nginx's handler of that directive, called as nginx would (cf, its
            // command entry, the conf of the block being parsed).
            return unsafe { set(cf, c as *const ngx_command_t as *mut ngx_command_t, conf) };
        }
    }
    let kind = if cfg!(upsync_stream) { "stream " } else { "" };
    conf_error(cf, "upsync_lb", &format!("nginx has no {kind}\"{directive}\" directive ({module_name} is not built in)"))
}

/// A module's directives (without the terminating empty entry).
///
/// # Safety
/// `m.commands` is null or an array ending with an entry whose name.len is 0, living as long as `m`.
unsafe fn commands_of(m: &'static ngx_module_t) -> &'static [ngx_command_t] {
    if m.commands.is_null() {
        return &[];
    }
    let mut n = 0;
    // SAFETY: contract: entries up to and including the terminator are readable.
    while unsafe { (*m.commands.add(n)).name.len } != 0 {
        n += 1;
    }
    // SAFETY: the `n` entries before the terminator, read above.
    unsafe { std::slice::from_raw_parts(m.commands, n) }
}

/// The configuration of `module` in one of nginx's per-module conf arrays (`main_conf` or
/// `srv_conf` of a stream conf ctx, `srv_conf` of a stream upstream block): ngx 0.5 has typed
/// accessors for HTTP (`HttpModuleMainConf`, `HttpModuleServerConf`, `HttpModuleConfExt`) but
/// none for stream, so the stream glue reads every conf through this one function.
///
/// # Safety
/// `confs` is null or the per-module array of a block of `module`'s kind (one entry per
/// `ctx_index`); its entry for `module`, when not null, is a `T` living as long as the cycle.
#[cfg_attr(not(upsync_stream), allow(dead_code))]
pub(crate) unsafe fn module_conf<T>(confs: *mut *mut c_void, module: &ngx_module_t) -> Option<&'static mut T> {
    if confs.is_null() {
        return None;
    }
    // SAFETY: contract: the array has an entry for every module of its kind.
    let conf = unsafe { *confs.add(module.ctx_index) };
    // SAFETY: contract: a non-null entry is a T that lives as long as the cycle.
    unsafe { conf.cast::<T>().as_mut() }
}

/// The main conf of the running cycle, if its http{} (stream{}) block exists and loads us.
///
/// # Safety
/// Call only from the main thread of a worker or the master (reads ngx_cycle).
pub(crate) unsafe fn cycle_main_conf() -> Option<&'static mut MainConf> {
    // SAFETY: ngx_cycle is the running cycle on the main thread (or null before the first).
    unsafe { super::main_conf_of(ngx_cycle as *mut ngx_cycle_t) }
}

/// Ends postconfiguration once the synced upstreams are collected in `main`: creates the shared
/// zone when there is at least one.
///
/// # Safety
/// `cf` is the conf nginx passed to postconfiguration; `main` lives as long as the cycle.
pub(crate) unsafe fn add_zone_if_synced(cf: &mut ngx_conf_t, main: &mut MainConf) -> ngx_int_t {
    if main.upstreams.is_empty() {
        return NGX_OK as ngx_int_t;
    }
    let size = main.shm_size.unwrap_or(DEFAULT_SHM_SIZE);
    // SAFETY: contract.
    match unsafe { shm::add_zone(cf, main, size) } {
        Ok(()) => NGX_OK as ngx_int_t,
        Err(e) => {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "upsync: {}", e);
            NGX_ERROR as ngx_int_t
        }
    }
}

/// Whether the synced upstream `name` gets a consistent-hash ring with every list
/// ([`conf::hash_ring`]: its `upsync_lb` checked against nginx's `hash` in the block, where
/// `hash` is a key and `consistent` a ring nginx's init built). `zone`: the block has a `zone`,
/// where nginx >= 1.27.3 builds its ring lazily, on the first request. `None` when `upsync_lb`
/// and `hash` disagree, the refusal logged.
pub(crate) fn hash_ring(cf: &mut ngx_conf_t, name: &str, lb: Option<Lb>, hash: bool, consistent: bool, zone: bool) -> Option<bool> {
    let ring_built_lazily = zone
        && cfg!(all(
            nginx1_27_3,
            any(all(not(upsync_stream), ngx_feature = "http_upstream_zone"), all(upsync_stream, ngx_feature = "stream_upstream_zone"))
        ));
    match conf::hash_ring(lb, hash, consistent, ring_built_lazily) {
        Ok(ring) => Some(ring),
        Err(e) => {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "upsync: upstream \"{}\": {}", name, e);
            None
        }
    }
}

/// The first argument as an absolute path (relative to nginx's prefix, as nginx does for paths).
///
/// # Safety
/// `cf` must be a directive handler's cf with at least one argument.
pub(crate) unsafe fn full_name_of_arg(cf: *mut ngx_conf_t) -> Result<String, String> {
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

/// A directive of the module's table.
pub(crate) const fn command(
    name: ngx_str_t,
    type_: ngx_uint_t,
    set: unsafe extern "C" fn(*mut ngx_conf_t, *mut ngx_command_t, *mut c_void) -> *mut c_char,
    conf: usize,
) -> ngx_command_t {
    ngx_command_t { name, type_, set: Some(set), conf, offset: 0, post: ptr::null_mut() }
}
