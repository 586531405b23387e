//! The shared zone ("upsync" of the HTTP module, "upsync_stream" of the stream module): a header (configuration generations, the leader lease, the table of
//! running workers) and one slot per synced upstream. A slot holds the upstream's server list
//! (compact binary, in slab memory) and its metadata (inline, fixed size), plus two counters:
//! `servers_version` (moves when the list changes: workers rebuild their peers) and
//! `state_version` (moves on any change, e.g. a new error).
//!
//! All slab allocation happens on nginx main threads (master during config load, workers on
//! their event loop) under the zone's mutex; the poller thread never touches the zone.
//!
//! Slots are found by key (upstream name + where it syncs from, [`crate::model::slot_key`]), so
//! after `nginx -s reload` the new workers share the old slots: they start from the latest list,
//! no Consul round trip. Slots that no running configuration uses are freed at the next
//! configuration load ([`collect_garbage`]).
//!
//! Generations. Every configuration load (start, reload) takes the next number
//! (`last_generation`) in the zone's init, but only a load that gets through nginx's whole cycle
//! initialisation *commits* it (`committed_generation`, set in the master's `init_module`, which
//! nginx runs after everything that can fail: listening sockets, open files, other zones). A
//! worker leads only if it runs the committed generation, so a reload that fails after the zones
//! were set up (port taken, file missing, `strong_dependency=on` with Consul down) changes
//! nothing: the running workers keep the lease and keep syncing.
use core::ffi::c_void;
use core::ptr;
use core::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use ngx::core::SlabPool;
use ngx::ffi::*;

use super::{MainConf, SrvConf};
use crate::fails::{FailEntry, FailState, Recorded};
use crate::lease::Lease;
use crate::model::{encode_servers, unix_ms, Origin, SlotMeta};

const MAGIC: u64 = 0x7570_7379_6e63_0003; // "upsync" v3 (slots with a failure table)
/// Workers (of every configuration still running) the zone keeps track of.
const MAX_WORKERS: usize = 1024;
/// Room for a slot's metadata (origin, indexes, times, the last error message).
pub const META_CAP: usize = 1024;

#[repr(C)]
#[derive(Clone, Copy)]
struct WorkerEntry {
    pid: i64,
    generation: u64,
}

#[repr(C)]
pub struct Header {
    magic: u64,
    /// The generation the last configuration load took (loads that failed included).
    last_generation: AtomicU64,
    /// The generation of the newest configuration that loaded completely (its workers run or
    /// are being started). Only its workers may lead.
    pub committed_generation: AtomicU64,
    /// The lease, only written under the zone's mutex by [`update_lease`] (read, decide and
    /// write are one critical section: pid, generation and heartbeat change together).
    lease_pid: AtomicI64,
    lease_generation: AtomicU64,
    lease_heartbeat_ms: AtomicU64,
    /// Non-zero once a worker could not register (table full): slots are then never freed.
    untracked_workers: u64,
    /// Running workers and their generation (pid 0: free entry); under the zone's mutex.
    workers: [WorkerEntry; MAX_WORKERS],
    /// All live slots, newest first; under the zone's mutex.
    slots: *mut Slot,
}

#[repr(C)]
pub struct Slot {
    next: *mut Slot,
    key: u64,
    /// The newest configuration generation that uses this slot (under the mutex).
    generation: u64,
    pub servers_version: AtomicU64,
    pub state_version: AtomicU64,
    /// The list ([`encode_servers`]), in slab memory; guarded by the mutex.
    servers: *mut u8,
    servers_len: usize,
    /// [`SlotMeta`] encoded, inline so that recording a problem never needs an allocation.
    meta_len: usize,
    meta: [u8; META_CAP],
    /// Upstreams with `zone`: the servers' shared failure state ([`crate::fails`]), in slab
    /// memory (null until a first failure), `fails_len` entries used of `fails_cap`; guarded
    /// by the mutex. `fail_epoch` moves at every change, so workers copy the table only then.
    pub fail_epoch: AtomicU64,
    fails: *mut FailEntry,
    fails_len: usize,
    fails_cap: usize,
}

/// The zone's mutex, held for the life of the value (released on drop, also when unwinding),
/// and the slab allocations made under it.
struct Locked(*mut ngx_slab_pool_t);

impl Locked {
    /// # Safety
    /// `pool` is the zone's slab pool, mapped in this process.
    unsafe fn new(pool: *mut ngx_slab_pool_t) -> Locked {
        // SAFETY: contract; nginx's shmtx works across processes and threads.
        unsafe { ngx_shmtx_lock(&mut (*pool).mutex) };
        Locked(pool)
    }

    /// `size` bytes of the zone (null when it is full).
    fn alloc(&self, size: usize) -> *mut c_void {
        // SAFETY: the pool is the zone's (contract of `new`) and its mutex is held.
        unsafe { ngx_slab_alloc_locked(self.0, size) }
    }

    /// # Safety
    /// `p` was allocated in this zone and is not used after.
    unsafe fn free(&self, p: *mut c_void) {
        // SAFETY: contract; the mutex is held.
        unsafe { ngx_slab_free_locked(self.0, p) };
    }
}

impl Drop for Locked {
    fn drop(&mut self) {
        // SAFETY: locked in `new` by this thread.
        unsafe { ngx_shmtx_unlock(&mut (*self.0).mutex) };
    }
}

/// Registers the zone; nginx creates it (or keeps the old one across a reload when the size is
/// unchanged) and calls [`init_zone`] in the master before forking workers.
///
/// # Safety
/// `cf` must be a valid conf during postconfiguration; `main` lives as long as the cycle.
pub unsafe fn add_zone(cf: &mut ngx_conf_t, main: &mut MainConf, size: usize) -> Result<(), String> {
    let zone_name = super::ZONE_NAME;
    let mut name = ngx_str_t { len: zone_name.len(), data: zone_name.as_ptr() as *mut u_char };
    // SAFETY: cf is valid; the tag (our module's address) is stable across reloads because nginx
    // keeps the module loaded.
    let zone = unsafe { ngx_shared_memory_add(cf, &mut name, size, super::zone_tag()) };
    if zone.is_null() {
        return Err(format!("cannot add the shared memory zone \"{zone_name}\""));
    }
    // SAFETY: zone was just returned by nginx, which keeps it for the life of the cycle.
    let z = unsafe { &mut *zone };
    if !z.data.is_null() {
        return Err(format!("the shared memory zone \"{zone_name}\" is already used by another module"));
    }
    z.init = Some(init_zone);
    z.data = main as *mut MainConf as *mut c_void;
    main.shm_zone = zone;
    Ok(())
}

/// The zone's init, in the master for every configuration load.
unsafe extern "C" fn init_zone(zone: *mut ngx_shm_zone_t, old_data: *mut c_void) -> ngx_int_t {
    super::guard("the shared zone's init", NGX_ERROR as ngx_int_t, || {
        // SAFETY: nginx passes the zone registered in add_zone, mapped and initialised.
        let zone = unsafe { &*zone };
        // SAFETY: add_zone set data to this cycle's MainConf.
        let main = unsafe { &mut *(zone.data as *mut MainConf) };
        // SAFETY: between the zone's init and the next reload, in the master.
        let Some(mut pool) = (unsafe { SlabPool::from_shm_zone(zone) }) else {
            log_emerg(&format!("upsync: the shared memory zone \"{}\" is not mapped", super::ZONE_NAME));
            return NGX_ERROR as ngx_int_t;
        };
        // SAFETY: master, during the cycle's init, pool of this zone.
        match unsafe { init_zone_contents(main, pool.as_mut(), !old_data.is_null()) } {
            Ok(()) => NGX_OK as ngx_int_t,
            Err(e) => {
                log_emerg(&e);
                NGX_ERROR as ngx_int_t
            }
        }
    })
}

/// Finds or creates the header and the slots of this configuration's upstreams, gives each new
/// slot its first list (from Consul when `strong_dependency=on`, failing the load if Consul
/// cannot be reached; else from the dump file when there is one) and frees the slots no running
/// configuration uses any more.
///
/// # Safety
/// Master, during the cycle's init; `pool` is the zone's slab pool.
unsafe fn init_zone_contents(main: &mut MainConf, pool: *mut ngx_slab_pool_t, reused: bool) -> Result<(), String> {
    // SAFETY: contract; `data` of the pool is ours (we set it when creating the header).
    let header = unsafe { header_of(pool, reused)? };
    main.header = header;
    // SAFETY: header lives in the zone for the life of the process.
    let h = unsafe { &mut *header };
    main.generation = h.last_generation.fetch_add(1, Ordering::AcqRel) + 1;
    for &srv in &main.upstreams {
        // SAFETY: the synced upstream confs of this configuration.
        let srv = unsafe { &mut *srv };
        // SAFETY: master; header and pool of this zone.
        let slot = unsafe { find_or_create_slot(pool, header, srv.key, main.generation) }
            .ok_or("upsync: the shared zone is full; raise upsync_shm_size")?;
        srv.slot = ptr::NonNull::new(slot);
        srv.shpool = ptr::NonNull::new(pool);
        // SAFETY: slot just found or created in this zone.
        if unsafe { (*slot).servers_version.load(Ordering::Acquire) } == 0 {
            // SAFETY: master during the zone's init.
            unsafe { first_list(pool, slot, srv)? };
        }
    }
    // SAFETY: master; header and pool of this zone.
    unsafe { collect_garbage(pool, header) };
    Ok(())
}

/// # Safety
/// Master; `pool` is the zone's slab pool.
unsafe fn header_of(pool: *mut ngx_slab_pool_t, reused: bool) -> Result<*mut Header, String> {
    // SAFETY: contract.
    let pool = unsafe { &mut *pool };
    let header = pool.data as *mut Header;
    // SAFETY: a reused zone's `data` is the header we wrote (checked by its magic number).
    if reused && !header.is_null() && unsafe { (*header).magic } == MAGIC {
        return Ok(header);
    }
    // SAFETY: contract: the zone's pool; the master is alone in it during the zone's init.
    let header = unsafe { ngx_slab_alloc(pool, core::mem::size_of::<Header>()) } as *mut Header;
    if header.is_null() {
        return Err("upsync: the shared zone is too small for its header; raise upsync_shm_size".into());
    }
    let fresh = Header {
        magic: MAGIC,
        last_generation: AtomicU64::new(0),
        committed_generation: AtomicU64::new(0),
        lease_pid: AtomicI64::new(0),
        lease_generation: AtomicU64::new(0),
        lease_heartbeat_ms: AtomicU64::new(0),
        untracked_workers: 0,
        workers: [WorkerEntry { pid: 0, generation: 0 }; MAX_WORKERS],
        slots: ptr::null_mut(),
    };
    // SAFETY: just allocated, large enough for a Header (slab memory is aligned to its size class).
    unsafe { ptr::write(header, fresh) };
    pool.data = header as *mut c_void;
    pool.log_ctx = super::ZONE_LOG_CTX.as_ptr() as *mut u_char;
    Ok(header)
}

/// The configuration `generation` loaded completely (the master's `init_module`): its workers
/// may lead from now on.
///
/// # Safety
/// Master, `header` of the running zone.
pub unsafe fn commit(header: *mut Header, generation: u64) {
    // SAFETY: contract.
    unsafe { (*header).committed_generation.fetch_max(generation, Ordering::AcqRel) };
}

/// # Safety
/// Master; `pool`/`header` from the zone.
unsafe fn find_or_create_slot(pool: *mut ngx_slab_pool_t, header: *mut Header, key: u64, generation: u64) -> Option<*mut Slot> {
    // SAFETY: contract.
    let lock = unsafe { Locked::new(pool) };
    // SAFETY: contract; the slot list and `generation` are guarded by the mutex, held.
    let h = unsafe { &mut *header };
    let mut s = h.slots;
    while !s.is_null() {
        // SAFETY: every slot in the list is live slab memory of this zone (under the mutex).
        let slot = unsafe { &mut *s };
        if slot.key == key {
            slot.generation = slot.generation.max(generation);
            return Some(s);
        }
        s = slot.next;
    }
    let slot = lock.alloc(core::mem::size_of::<Slot>()) as *mut Slot;
    if slot.is_null() {
        return None;
    }
    let fresh = Slot {
        next: h.slots,
        key,
        generation,
        servers_version: AtomicU64::new(0),
        state_version: AtomicU64::new(0),
        servers: ptr::null_mut(),
        servers_len: 0,
        meta_len: 0,
        meta: [0; META_CAP],
        fail_epoch: AtomicU64::new(0),
        fails: ptr::null_mut(),
        fails_len: 0,
        fails_cap: 0,
    };
    // SAFETY: just allocated, large enough for a Slot.
    unsafe { ptr::write(slot, fresh) };
    h.slots = slot;
    Some(slot)
}

/// Frees the slots that no running configuration uses: those whose newest user is older than
/// both the committed configuration (whose workers run or are about to be forked) and every
/// registered worker. Slots of a failed load are freed once nothing older runs.
///
/// A worker forked by an older configuration registers in its `init_process`, long before the
/// master can have committed a newer configuration and loaded yet another one.
///
/// # Safety
/// Master; `pool`/`header` from the zone.
unsafe fn collect_garbage(pool: *mut ngx_slab_pool_t, header: *mut Header) {
    // SAFETY: contract.
    let lock = unsafe { Locked::new(pool) };
    // SAFETY: contract; workers and slots are guarded by the mutex, held.
    let h = unsafe { &mut *header };
    if h.untracked_workers != 0 {
        return;
    }
    let mut keep_from = h.committed_generation.load(Ordering::Acquire);
    for e in h.workers.iter_mut().filter(|e| e.pid != 0) {
        if process_exists(e.pid) {
            keep_from = keep_from.min(e.generation);
        } else {
            // Killed without running exit_process (SIGKILL, crash).
            *e = WorkerEntry { pid: 0, generation: 0 };
        }
    }
    let mut freed = 0usize;
    let mut link: &mut *mut Slot = &mut h.slots;
    while !link.is_null() {
        let s = *link;
        // SAFETY: every slot in the list is live slab memory of this zone (under the mutex).
        let slot = unsafe { &mut *s };
        if slot.generation < keep_from {
            *link = slot.next;
            // SAFETY: the slot is out of the list; its list, table and itself are this zone's
            // allocations that nothing else points to.
            unsafe {
                if !slot.servers.is_null() {
                    lock.free(slot.servers as *mut c_void);
                }
                if !slot.fails.is_null() {
                    lock.free(slot.fails as *mut c_void);
                }
                lock.free(s as *mut c_void);
            }
            freed += 1;
        } else {
            link = &mut slot.next;
        }
    }
    if freed > 0 {
        tracing::info!("freed {freed} shared slot(s) that no running configuration uses");
    }
}

/// Whether `pid` exists (kill with signal 0 checks existence and permission only).
pub fn process_exists(pid: i64) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 sends nothing.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Adds this worker (its pid and configuration generation) to the zone's table, so the slots it
/// uses are kept while it runs.
///
/// # Safety
/// Worker main thread; `main` of the running cycle with a header.
pub unsafe fn register_worker(main: &MainConf) {
    let pool = pool_of(main);
    let pid = std::process::id() as i64;
    // SAFETY: contract.
    let _lock = unsafe { Locked::new(pool) };
    // SAFETY: contract; the table is guarded by the mutex, held.
    let h = unsafe { &mut *main.header };
    if let Some(e) = h.workers.iter_mut().find(|e| e.pid == 0 || e.pid == pid || !process_exists(e.pid)) {
        *e = WorkerEntry { pid, generation: main.generation };
    } else {
        h.untracked_workers = 1;
        tracing::warn!("more than {MAX_WORKERS} nginx workers share the upsync zone: unused slots will not be freed until restart");
    }
}

/// Removes this worker from the zone's table (exit_process).
///
/// # Safety
/// Worker main thread; `main` of the running cycle with a header.
pub unsafe fn unregister_worker(main: &MainConf) {
    let pool = pool_of(main);
    let pid = std::process::id() as i64;
    // SAFETY: contract.
    let _lock = unsafe { Locked::new(pool) };
    // SAFETY: contract; the table is guarded by the mutex, held.
    let h = unsafe { &mut *main.header };
    for e in h.workers.iter_mut().filter(|e| e.pid == pid) {
        *e = WorkerEntry { pid: 0, generation: 0 };
    }
}

/// Reads the lease and writes what `decide` returns for it, in one critical section.
///
/// # Safety
/// Worker main thread; `main` of the running cycle with a header.
pub unsafe fn update_lease<T>(main: &MainConf, decide: impl FnOnce(Lease) -> (T, Option<Lease>)) -> T {
    let pool = pool_of(main);
    // SAFETY: contract.
    let _lock = unsafe { Locked::new(pool) };
    // SAFETY: contract; the lease is only written under the mutex, held.
    let h = unsafe { &*main.header };
    let lease = Lease {
        leader_pid: h.lease_pid.load(Ordering::Acquire),
        leader_generation: h.lease_generation.load(Ordering::Acquire),
        heartbeat_ms: h.lease_heartbeat_ms.load(Ordering::Acquire),
    };
    let (out, new) = decide(lease);
    if let Some(n) = new {
        h.lease_pid.store(n.leader_pid, Ordering::Release);
        h.lease_generation.store(n.leader_generation, Ordering::Release);
        h.lease_heartbeat_ms.store(n.heartbeat_ms, Ordering::Release);
    }
    out
}

/// The PID holding the lease (a lock-free read, for checks that tolerate a stale answer).
///
/// # Safety
/// `main` of the running cycle with a header.
pub unsafe fn leader_pid(main: &MainConf) -> i64 {
    // SAFETY: contract.
    unsafe { (*main.header).lease_pid.load(Ordering::Acquire) }
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
        let meta = SlotMeta { origin: Origin::Consul, consul_index: index, changed_ms: now, synced_ms: now, ..Default::default() };
        // SAFETY: contract of this function.
        return unsafe { install(pool, slot, &encode_servers(&servers), &meta) };
    }
    let Some(path) = &srv.sync.dump_path else { return Ok(()) };
    match std::fs::read_to_string(path) {
        Ok(text) => match crate::dump::parse(&text) {
            Ok(servers) if !servers.is_empty() => {
                tracing::info!("upstream \"{name}\": starting from the dump file {} ({} servers)", path.display(), servers.len());
                let meta = SlotMeta { origin: Origin::Dump, changed_ms: unix_ms(), ..Default::default() };
                // SAFETY: contract of this function.
                unsafe { install(pool, slot, &encode_servers(&servers), &meta) }
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

/// Replaces a slot's list with `servers` ([`encode_servers`]) and its metadata with `meta`, and
/// moves both versions. When the zone has no room for the list, nothing changes (the list,
/// its version and the metadata stay) and the error says so; the caller records it with
/// [`write_meta`].
///
/// # Safety
/// Main thread of the master or a worker; `pool` and `slot` from the zone.
pub unsafe fn install(pool: *mut ngx_slab_pool_t, slot: *mut Slot, servers: &[u8], meta: &SlotMeta) -> Result<(), String> {
    let meta = meta.encode_bounded(META_CAP);
    // SAFETY: contract.
    let lock = unsafe { Locked::new(pool) };
    // SAFETY: contract; the mutex, held, guards the list pointer, its length and the metadata.
    let s = unsafe { &mut *slot };
    let p = lock.alloc(servers.len().max(1)) as *mut u8;
    if p.is_null() {
        return Err(format!(
            "the shared zone \"{}\" has no room for a list of {} bytes; the workers keep the previous list; raise upsync_shm_size",
            super::ZONE_NAME,
            servers.len()
        ));
    }
    // SAFETY: p was just allocated with room for the list.
    unsafe { ptr::copy_nonoverlapping(servers.as_ptr(), p, servers.len()) };
    let old = s.servers;
    s.servers = p;
    s.servers_len = servers.len();
    if !old.is_null() {
        // SAFETY: the previous list, allocated in this zone, no longer in the slot.
        unsafe { lock.free(old as *mut c_void) };
    }
    s.store_meta(&meta);
    s.servers_version.fetch_add(1, Ordering::AcqRel);
    s.state_version.fetch_add(1, Ordering::AcqRel);
    Ok(())
}

/// Replaces a slot's metadata (never allocates: the zone may be full). The error it records,
/// if new, is first counted in `meta.errors` ([`SlotMeta::count_error`]), so the caller's copy
/// and the slot keep the same counters.
///
/// # Safety
/// Main thread; `pool` and `slot` from the zone.
pub unsafe fn write_meta(pool: *mut ngx_slab_pool_t, slot: *mut Slot, meta: &mut SlotMeta) {
    meta.count_error();
    let meta = meta.encode_bounded(META_CAP);
    // SAFETY: contract.
    let _lock = unsafe { Locked::new(pool) };
    // SAFETY: contract; the mutex, held, guards the metadata.
    let s = unsafe { &mut *slot };
    s.store_meta(&meta);
    s.state_version.fetch_add(1, Ordering::AcqRel);
}

impl Slot {
    /// Zone mutex held; `bytes` from `SlotMeta::encode_bounded(META_CAP)`.
    fn store_meta(&mut self, bytes: &[u8]) {
        self.meta[..bytes.len()].copy_from_slice(bytes);
        self.meta_len = bytes.len();
    }
}

/// A copy of a slot's list ([`crate::model::decode_servers`]) and the version it belongs to
/// (None: nothing stored yet).
///
/// # Safety
/// Main thread; `pool` and `slot` from the zone.
pub unsafe fn read_servers(pool: *mut ngx_slab_pool_t, slot: *mut Slot) -> Option<(u64, Vec<u8>)> {
    // SAFETY: contract.
    let _lock = unsafe { Locked::new(pool) };
    // SAFETY: contract; the mutex, held, guards the list.
    let s = unsafe { &*slot };
    let version = s.servers_version.load(Ordering::Acquire);
    if s.servers.is_null() {
        return None;
    }
    // SAFETY: `servers` holds `servers_len` bytes of slab memory (under the mutex).
    Some((version, unsafe { std::slice::from_raw_parts(s.servers, s.servers_len) }.to_vec()))
}

/// Records a server's failure state in the slot's shared table (growing it in the zone when
/// needed, after dropping the servers `listed` says are gone) and moves the epoch. When the zone
/// has no room, the state stays this worker's and the error says so.
///
/// # Safety
/// Worker main thread; `pool` and `slot` from the zone.
pub unsafe fn record_failure(
    pool: *mut ngx_slab_pool_t,
    slot: *mut Slot,
    addr: std::net::SocketAddr,
    state: FailState,
    listed: impl Fn(std::net::SocketAddr) -> bool,
) -> Result<(), String> {
    // SAFETY: contract.
    let lock = unsafe { Locked::new(pool) };
    // SAFETY: contract; the mutex, held, guards the table, its length and capacity.
    let s = unsafe { &mut *slot };
    loop {
        let table: &mut [FailEntry] = if s.fails.is_null() {
            &mut []
        } else {
            // SAFETY: `fails` holds `fails_cap` entries of slab memory (under the mutex).
            unsafe { std::slice::from_raw_parts_mut(s.fails, s.fails_cap) }
        };
        if let Recorded::Done(len) = crate::fails::record(table, s.fails_len, addr, state) {
            s.fails_len = len;
            break;
        }
        let kept = crate::fails::retain(table, s.fails_len, &listed);
        if kept < s.fails_len {
            s.fails_len = kept;
            continue;
        }
        let cap = crate::fails::grown(s.fails_len);
        let p = lock.alloc(cap * core::mem::size_of::<FailEntry>()) as *mut FailEntry;
        if p.is_null() {
            return Err(format!(
                "the shared zone \"upsync\" has no room for the failure state of {cap} servers; this worker keeps it for \
                 itself; raise upsync_shm_size"
            ));
        }
        if !s.fails.is_null() {
            // SAFETY: p has room for `cap` > `fails_len` entries; the old table is this zone's
            // and replaced right after.
            unsafe {
                ptr::copy_nonoverlapping(s.fails, p, s.fails_len);
                lock.free(s.fails as *mut c_void);
            }
        }
        s.fails = p;
        s.fails_cap = cap;
    }
    s.fail_epoch.fetch_add(1, Ordering::AcqRel);
    Ok(())
}

/// A copy of the slot's shared failure table and the epoch it belongs to.
///
/// # Safety
/// Main thread; `pool` and `slot` from the zone.
pub unsafe fn read_failures(pool: *mut ngx_slab_pool_t, slot: *mut Slot) -> (u64, Vec<FailEntry>) {
    // SAFETY: contract.
    let _lock = unsafe { Locked::new(pool) };
    // SAFETY: contract; the mutex, held, guards the table.
    let s = unsafe { &*slot };
    // SAFETY: `fails` holds `fails_len` used entries of slab memory (under the mutex).
    let entries = if s.fails.is_null() { Vec::new() } else { unsafe { std::slice::from_raw_parts(s.fails, s.fails_len) }.to_vec() };
    (s.fail_epoch.load(Ordering::Acquire), entries)
}

/// A slot's metadata and list version.
///
/// # Safety
/// Main thread; `pool` and `slot` from the zone.
pub unsafe fn read_meta(pool: *mut ngx_slab_pool_t, slot: *mut Slot) -> (u64, SlotMeta) {
    let (version, bytes) = {
        // SAFETY: contract.
        let _lock = unsafe { Locked::new(pool) };
        // SAFETY: contract; the mutex, held, guards the metadata.
        let s = unsafe { &*slot };
        (s.servers_version.load(Ordering::Acquire), s.meta[..s.meta_len].to_vec())
    };
    (version, if bytes.is_empty() { SlotMeta::default() } else { SlotMeta::decode(&bytes).unwrap_or_default() })
}

/// The zone's slab pool for this cycle.
pub fn pool_of(main: &MainConf) -> *mut ngx_slab_pool_t {
    // SAFETY: shm_zone is null or was set by add_zone; nginx maps the zone before its init and
    // keeps it for the life of the workers.
    let pool = unsafe { main.shm_zone.as_ref().and_then(|z| SlabPool::from_shm_zone(z)) };
    pool.map_or(ptr::null_mut(), |mut p| p.as_mut() as *mut ngx_slab_pool_t)
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
