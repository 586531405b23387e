//! The shared zone "upsync": a header (magic, config generation, leader lease) and one slot per
//! synced upstream. A slot holds the upstream's [`SlotState`] as JSON in slab memory plus two
//! counters: `servers_version` (moves when the server list changes: workers rebuild their peers)
//! and `state_version` (moves on any change, e.g. a new error).
//!
//! All slab allocation happens on nginx main threads (master during config load, workers on
//! their event loop) under the slab mutex; the poller thread never touches the zone.
//!
//! Slots are found by key (upstream name + where it syncs from), so after `nginx -s reload` the
//! new workers share the old slots: they start from the latest list, no Consul round trip.
use core::ffi::c_void;
use core::ptr;
use core::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use ngx::ffi::*;
use ngx::ngx_string;

use super::{MainConf, SrvConf};
use crate::model::{unix_ms, Origin, SlotState};

const MAGIC: u64 = 0x7570_7379_6e63_0001; // "upsync" v1

#[repr(C)]
pub struct Header {
    magic: u64,
    /// Bumped by every configuration load (start, reload).
    pub generation: AtomicU64,
    pub leader_pid: AtomicI64,
    pub leader_generation: AtomicU64,
    pub heartbeat_ms: AtomicU64,
    /// All slots ever created, newest first.
    slots: *mut Slot,
}

#[repr(C)]
pub struct Slot {
    next: *mut Slot,
    key: u64,
    pub servers_version: AtomicU64,
    pub state_version: AtomicU64,
    /// JSON of SlotState, in slab memory; guarded by the slab mutex.
    data: *mut u8,
    len: usize,
}

/// Registers the zone; nginx creates it (or keeps the old one across a reload when the size is
/// unchanged) and calls [`init_zone`] in the master before forking workers.
///
/// # Safety
/// `cf` must be a valid conf during postconfiguration; `main` lives as long as the cycle.
pub unsafe fn add_zone(cf: &mut ngx_conf_t, main: &mut MainConf, size: usize) -> Result<(), String> {
    let mut name = ngx_string!("upsync");
    // SAFETY: cf is valid; the tag (our module's address) is stable across reloads because nginx
    // keeps the module loaded.
    let zone = unsafe { ngx_shared_memory_add(cf, &mut name, size, ptr::addr_of_mut!(super::ngx_http_upsync_module) as *mut c_void) };
    if zone.is_null() {
        return Err("cannot add the shared memory zone \"upsync\"".into());
    }
    // SAFETY: zone was just returned by nginx.
    unsafe {
        if !(*zone).data.is_null() {
            return Err("the shared memory zone \"upsync\" is already used by another module".into());
        }
        (*zone).init = Some(init_zone);
        (*zone).data = main as *mut MainConf as *mut c_void;
    }
    main.shm_zone = zone;
    Ok(())
}

/// The zone's init, in the master for every configuration load (not for `nginx -t`). Finds or
/// creates the header and the slots of this configuration's upstreams and gives each new slot
/// its first list: from Consul when `strong_dependency=on` (failing the load if Consul cannot be
/// reached), else from the dump file when there is one.
unsafe extern "C" fn init_zone(zone: *mut ngx_shm_zone_t, old_data: *mut c_void) -> ngx_int_t {
    // SAFETY: nginx passes the zone registered in add_zone, whose data is our MainConf; the slab
    // pool sits at the start of the zone's memory and nginx initialised it.
    unsafe {
        let main = &mut *((*zone).data as *mut MainConf);
        let pool = (*zone).shm.addr as *mut ngx_slab_pool_t;
        let mut header = (*pool).data as *mut Header;
        if old_data.is_null() || header.is_null() || (*header).magic != MAGIC {
            header = ngx_slab_alloc(pool, core::mem::size_of::<Header>()) as *mut Header;
            if header.is_null() {
                log_emerg("upsync: the shared zone is too small for its header; raise upsync_shm_size");
                return NGX_ERROR as ngx_int_t;
            }
            ptr::write(
                header,
                Header {
                    magic: MAGIC,
                    generation: AtomicU64::new(0),
                    leader_pid: AtomicI64::new(0),
                    leader_generation: AtomicU64::new(0),
                    heartbeat_ms: AtomicU64::new(0),
                    slots: ptr::null_mut(),
                },
            );
            (*pool).data = header as *mut c_void;
            (*pool).log_ctx = c" in upsync zone \"upsync\"".as_ptr() as *mut u_char;
        }
        main.header = header;
        main.generation = (*header).generation.fetch_add(1, Ordering::AcqRel) + 1;
        for &srv in &main.upstreams {
            let srv = &mut *srv;
            let slot = match find_or_create_slot(pool, header, srv.key) {
                Some(s) => s,
                None => {
                    log_emerg("upsync: the shared zone is full; raise upsync_shm_size");
                    return NGX_ERROR as ngx_int_t;
                }
            };
            srv.slot = ptr::NonNull::new(slot);
            srv.shpool = ptr::NonNull::new(pool);
            if (*slot).servers_version.load(Ordering::Acquire) == 0 {
                if let Err(e) = first_list(pool, slot, srv) {
                    log_emerg(&e);
                    return NGX_ERROR as ngx_int_t;
                }
            }
        }
    }
    NGX_OK as ngx_int_t
}

/// # Safety
/// Master or worker main thread; `pool`/`header` from the zone.
unsafe fn find_or_create_slot(pool: *mut ngx_slab_pool_t, header: *mut Header, key: u64) -> Option<*mut Slot> {
    // SAFETY: the slot list is only modified here, in the master, before workers fork;
    // allocation takes the slab mutex.
    unsafe {
        let mut s = (*header).slots;
        while !s.is_null() {
            if (*s).key == key {
                return Some(s);
            }
            s = (*s).next;
        }
        let slot = ngx_slab_alloc(pool, core::mem::size_of::<Slot>()) as *mut Slot;
        if slot.is_null() {
            return None;
        }
        ptr::write(
            slot,
            Slot {
                next: (*header).slots,
                key,
                servers_version: AtomicU64::new(0),
                state_version: AtomicU64::new(0),
                data: ptr::null_mut(),
                len: 0,
            },
        );
        (*header).slots = slot;
        Some(slot)
    }
}

/// The list a new slot starts with.
///
/// # Safety
/// Master, during the zone's init.
unsafe fn first_list(pool: *mut ngx_slab_pool_t, slot: *mut Slot, srv: &SrvConf) -> Result<(), String> {
    let name = upstream_name(srv);
    let Some(u) = &srv.sync.upsync else { return Ok(()) };
    // `nginx -t` initialises shared zones too, but a config test must not depend on Consul.
    // SAFETY: a plain read of nginx's global flag on the master's main thread.
    let testing = unsafe { ngx_test_config } != 0;
    if u.strong_dependency && !testing {
        let (servers, index) = crate::poller::fetch_initial(&name, &srv.sync, 3).map_err(|e| {
            format!(
                "upsync: upstream \"{name}\": cannot get its servers from {}: {e}; nginx does not start because \
                 strong_dependency=on (use strong_dependency=off to start from upsync_dump_path or the servers in the block)",
                srv.source
            )
        })?;
        let now = unix_ms();
        let state =
            SlotState { servers, origin: Origin::Consul, consul_index: index, changed_ms: now, synced_ms: now, ..Default::default() };
        // SAFETY: contract of this function.
        return unsafe { write(pool, slot, &state, true) };
    }
    let Some(path) = &srv.sync.dump_path else { return Ok(()) };
    match std::fs::read_to_string(path) {
        Ok(text) => match crate::dump::parse(&text) {
            Ok(servers) if !servers.is_empty() => {
                tracing::info!("upstream \"{name}\": starting from the dump file {} ({} servers)", path.display(), servers.len());
                let state = SlotState { servers, origin: Origin::Dump, changed_ms: unix_ms(), ..Default::default() };
                // SAFETY: contract of this function.
                unsafe { write(pool, slot, &state, true) }
            }
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::warn!(
                    "upstream \"{name}\": ignoring the dump file {}: {e}; starting from the servers in the block",
                    path.display()
                );
                Ok(())
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => {
            tracing::warn!(
                "upstream \"{name}\": cannot read the dump file {}: {e}; starting from the servers in the block",
                path.display()
            );
            Ok(())
        }
    }
}

/// Replaces a slot's state. `servers_changed` moves `servers_version` (workers rebuild peers).
///
/// # Safety
/// Main thread of the master or a worker; `pool` and `slot` from the zone.
pub unsafe fn write(pool: *mut ngx_slab_pool_t, slot: *mut Slot, state: &SlotState, servers_changed: bool) -> Result<(), String> {
    let bytes = state.to_json();
    // SAFETY: the slab mutex guards data/len; memory comes from and returns to the same pool.
    unsafe {
        ngx_shmtx_lock(&mut (*pool).mutex);
        let p = ngx_slab_alloc_locked(pool, bytes.len().max(1)) as *mut u8;
        if p.is_null() {
            ngx_shmtx_unlock(&mut (*pool).mutex);
            return Err(format!("the shared zone \"upsync\" has no room for a {} byte server list; raise upsync_shm_size", bytes.len()));
        }
        ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len());
        let old = (*slot).data;
        (*slot).data = p;
        (*slot).len = bytes.len();
        if !old.is_null() {
            ngx_slab_free_locked(pool, old as *mut c_void);
        }
        if servers_changed {
            (*slot).servers_version.fetch_add(1, Ordering::AcqRel);
        }
        (*slot).state_version.fetch_add(1, Ordering::AcqRel);
        ngx_shmtx_unlock(&mut (*pool).mutex);
    }
    Ok(())
}

/// A copy of a slot's state and the servers version it belongs to (None: nothing stored yet).
///
/// # Safety
/// Main thread; `pool` and `slot` from the zone.
pub unsafe fn read(pool: *mut ngx_slab_pool_t, slot: *mut Slot) -> Option<(u64, Result<SlotState, String>)> {
    // SAFETY: the slab mutex guards data/len.
    let (version, bytes) = unsafe {
        ngx_shmtx_lock(&mut (*pool).mutex);
        let version = (*slot).servers_version.load(Ordering::Acquire);
        let bytes = if (*slot).data.is_null() { None } else { Some(std::slice::from_raw_parts((*slot).data, (*slot).len).to_vec()) };
        ngx_shmtx_unlock(&mut (*pool).mutex);
        (version, bytes?)
    };
    Some((version, SlotState::from_json(&bytes)))
}

/// The zone's slab pool for this cycle.
pub fn pool_of(main: &MainConf) -> *mut ngx_slab_pool_t {
    if main.shm_zone.is_null() {
        return ptr::null_mut();
    }
    // SAFETY: shm_zone was set by add_zone and nginx mapped it before init.
    unsafe { (*main.shm_zone).shm.addr as *mut ngx_slab_pool_t }
}

/// The upstream's name as written in `upstream NAME {}`.
pub fn upstream_name(srv: &SrvConf) -> String {
    match srv.us {
        // SAFETY: `us` points to the upstream conf of this cycle, which outlives srv.
        Some(us) => String::from_utf8_lossy(unsafe { us.as_ref().host.as_bytes() }).into_owned(),
        None => String::new(),
    }
}

fn log_emerg(msg: &str) {
    // SAFETY: called on the master's main thread during cycle init, where ngx_cycle->log is valid.
    unsafe {
        let log = (*ngx_cycle).log;
        ngx::log::log_error(NGX_LOG_EMERG as ngx_uint_t, log, 0, msg.as_bytes());
    }
}
