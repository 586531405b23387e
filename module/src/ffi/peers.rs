//! Synced servers as nginx round-robin peers.
//!
//! We never edit nginx's peer lists in place (nginx-upsync-module does, and frees removed peers
//! after a 30-minute timer). Each new server list becomes a new, immutable-shaped
//! [`Generation`] of `ngx_http_upstream_rr_peers_t`, installed in `us->peer.data` by a plain
//! pointer store on the worker's main thread. nginx's own round-robin code (and keepalive,
//! least_conn, ip_hash, which call it) then balances over it exactly as over a static list:
//! smooth weighted round robin, max_fails/fail_timeout, down, backup, next-upstream retries.
//!
//! Every request that starts on a generation holds an `Rc` to it until its pool is destroyed,
//! so a removed server's memory is released when its last request ends, not after a timer.
use core::ffi::c_void;
use core::ptr;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;

use ngx::ffi::*;

use super::addr::{sockaddr, socket_addr};
use super::{shm, srv_conf_of, SrvConf};
use crate::fails::FailState;
use crate::model::Server;

/// Lists whose encoded form is at most this many bytes (about 2,500 IPv4 servers, a millisecond
/// or two of work) are built on the event loop when a request or the tick first needs them;
/// larger ones on a short-lived thread, so a change in an upstream of 50,000 servers costs the
/// event loop only the carry-over of the per-peer state (one hash lookup per server).
const INLINE_BUILD_MAX_BYTES: usize = 32 * 1024;

type AddrIndex = HashMap<SocketAddr, usize, fnv::FnvBuildHasher>;

/// One installed peer list and everything it points to.
pub struct Generation {
    /// The list as synced (for upstream_show); excludes the placeholder of an empty list.
    pub servers: Vec<Server>,
    primary: Box<ngx_http_upstream_rr_peers_t>,
    backup: Option<Box<ngx_http_upstream_rr_peers_t>>,
    /// Primary peers first, then backup peers; linked with `next` inside each list. Never
    /// resized after construction (nginx holds pointers into it).
    peers: Box<[ngx_http_upstream_rr_peer_t]>,
    /// For `servers[i]`, its index in `peers`.
    peer_index: Vec<usize>,
    /// Address -> index in `peers` (built with the generation, used to carry state over).
    by_addr: AddrIndex,
    _addrs: Box<[libc::sockaddr_storage]>,
    _names: Box<[u8]>,
    /// With `hash KEY consistent`: the ring in the layout of nginx's
    /// `ngx_http_upstream_chash_points_t` (`number`, then `{uint32 hash; ngx_str_t *server}`
    /// points naming this generation's peers), installed in the hash module's conf with the
    /// generation. Words: the header, then two per point.
    points: Option<Box<[u64]>>,
}

/// The consistent-hash ring of the primary `peers` (`servers` in the same order), laid out as
/// nginx's `ngx_http_upstream_chash_points_t`; the points name the peers' `server` strings.
fn ring_points(servers: &[&Server], peers: &mut [ngx_http_upstream_rr_peer_t]) -> Box<[u64]> {
    let names: Vec<&[u8]> = peers.iter().map(|p| p.server.as_bytes()).collect();
    let ring = crate::chash::ring(names.iter().zip(servers).map(|(n, s)| (*n, s.weight.max(1) as usize)));
    let mut words = vec![0u64; 1 + 2 * ring.len()].into_boxed_slice();
    let base = words.as_mut_ptr();
    // SAFETY: `words` has room for the header word and 2 words (16 bytes, the size and 8-byte
    // alignment of ChashPoint) per point; the server pointers point into `peers`, which the
    // generation owns and never resizes.
    unsafe {
        *(base as *mut ngx_uint_t) = ring.len() as ngx_uint_t;
        let points = base.add(1) as *mut ChashPoint;
        for (i, p) in ring.iter().enumerate() {
            points.add(i).write(ChashPoint { hash: p.hash, server: &mut peers[p.server].server });
        }
    }
    words
}

/// One point of nginx's consistent-hash ring (`ngx_http_upstream_chash_point_t`).
#[repr(C)]
struct ChashPoint {
    hash: u32,
    server: *mut ngx_str_t,
}

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

/// A generation built on a builder thread, waiting to be installed by the event loop.
struct Prepared(Generation);

// SAFETY: a prepared generation's raw pointers point into its own boxes (which move with it) or
// to the upstream's `host` string, which the builder thread never dereferences; nginx sees the
// generation only after the event loop received and installed it.
unsafe impl Send for Prepared {}

/// A list being built on a builder thread.
pub struct Pending {
    rx: std::sync::mpsc::Receiver<Result<Prepared, String>>,
}

impl Generation {
    /// The pointer nginx's balancers read from `us->peer.data`.
    pub fn data(&self) -> *mut c_void {
        &*self.primary as *const ngx_http_upstream_rr_peers_t as *mut c_void
    }

    /// `(fails, active requests)` this worker counts for `servers[i]`.
    pub fn peer_state(&self, i: usize) -> (u64, u64) {
        let p = &self.peers[self.peer_index[i]];
        (p.fails as u64, p.conns as u64)
    }

    /// Builds a generation for `servers` with fresh per-peer state. Touches no nginx memory
    /// (`name` is only stored), so it may run on any thread; [`Generation::carry_over`] then
    /// brings the state of servers that stay, on the event loop.
    fn prepare(servers: Vec<Server>, name: *mut ngx_str_t, chash: bool) -> Generation {
        // Peers sorted by address whatever the listing order of `servers` (which follows
        // nginx-upsync-module's history order for upstream_show and the dump): the same servers
        // give the same peer order on every nginx instance, which `hash` and `ip_hash` need.
        let mut primary_servers: Vec<&Server> = servers.iter().filter(|s| !s.backup).collect();
        let mut backup_servers: Vec<&Server> = servers.iter().filter(|s| s.backup).collect();
        primary_servers.sort_by_key(|s| s.addr);
        backup_servers.sort_by_key(|s| s.addr);
        // An empty primary list would divide by zero in ip_hash/hash (total_weight 0): an empty
        // list is one placeholder server marked down, which fails requests fast with 502.
        let placeholder =
            Server { addr: SocketAddr::from(([127, 0, 0, 1], 0)), weight: 1, max_fails: 0, fail_timeout: 0, down: true, backup: false };
        let has_placeholder = primary_servers.is_empty();
        let primary: Vec<&Server> = if has_placeholder { vec![&placeholder] } else { primary_servers };
        let all: Vec<&Server> = primary.iter().chain(backup_servers.iter()).copied().collect();

        let mut names = Vec::with_capacity(all.len() * 20);
        let mut spans = Vec::with_capacity(all.len());
        for s in &all {
            let start = names.len();
            crate::model::write_addr(&mut names, &s.addr);
            spans.push((start, names.len() - start));
        }
        let mut names = names.into_boxed_slice();
        let mut addrs: Box<[libc::sockaddr_storage]> = all.iter().map(|s| sockaddr(&s.addr).0).collect();
        // SAFETY: ngx_http_upstream_rr_peer_t is a C struct of integers and pointers; all-zero
        // is its "unset" state (nginx itself pcallocs peers). From nginx 1.27.3 on, that also
        // means `refs` 0, not a `zombie`, and no `host` (not a peer of nginx's `resolve`).
        let mut peers: Box<[ngx_http_upstream_rr_peer_t]> = (0..all.len()).map(|_| unsafe { core::mem::zeroed() }).collect();
        let mut by_addr = AddrIndex::with_capacity_and_hasher(all.len(), Default::default());
        for (i, s) in all.iter().enumerate() {
            let p = &mut peers[i];
            p.sockaddr = &mut addrs[i] as *mut libc::sockaddr_storage as *mut sockaddr;
            p.socklen = sockaddr(&s.addr).1;
            // SAFETY: names is not resized after this point; the span is inside it.
            let name_ptr = unsafe { names.as_mut_ptr().add(spans[i].0) };
            p.name = ngx_str_t { len: spans[i].1, data: name_ptr };
            p.server = p.name;
            p.weight = s.weight.max(1) as ngx_int_t;
            p.effective_weight = p.weight;
            p.max_fails = s.max_fails as ngx_uint_t;
            p.fail_timeout = s.fail_timeout as time_t;
            p.down = s.down as ngx_uint_t;
            if !(has_placeholder && i == 0) {
                by_addr.insert(s.addr, i);
            }
        }
        let np = primary.len();
        let nb = backup_servers.len();
        // Link each list with `next`.
        for i in 0..all.len() {
            let last_of_list = i + 1 == np || i + 1 == all.len();
            peers[i].next = if last_of_list { ptr::null_mut() } else { &mut peers[i + 1] as *mut _ };
        }
        let base = peers.as_mut_ptr();
        let list = |first: usize, n: usize| -> Box<ngx_http_upstream_rr_peers_t> {
            // SAFETY: as above, zero is the unset state of the C struct (from nginx 1.27.3 on:
            // `config` null, so nginx never rebuilds a hash ring from it, and no `resolve` peers).
            let mut l: Box<ngx_http_upstream_rr_peers_t> = Box::new(unsafe { core::mem::zeroed() });
            let slice = &all[first..first + n];
            let w: usize = slice.iter().map(|s| s.weight.max(1) as usize).sum();
            l.number = n as ngx_uint_t;
            l.total_weight = w as ngx_uint_t;
            l.tries = slice.iter().filter(|s| !s.down).count() as ngx_uint_t;
            l.set_weighted((w != n) as u32);
            l.name = name;
            // SAFETY: first < len; peers is never resized.
            l.peer = unsafe { base.add(first) };
            l
        };
        let mut primary_list = list(0, np);
        let backup_list = (nb > 0).then(|| list(np, nb));
        primary_list.set_single((np == 1 && nb == 0) as u32);
        if let Some(b) = &backup_list {
            primary_list.next = &**b as *const ngx_http_upstream_rr_peers_t as *mut _;
        }
        // Every server of `servers` is in `by_addr` (addresses are unique in a list).
        let peer_index = servers.iter().map(|s| by_addr.get(&s.addr).copied().unwrap_or(0)).collect();
        let points = chash.then(|| ring_points(&all[..np], &mut peers[..np]));
        drop(all);
        drop(primary);
        drop(backup_servers);
        Generation { servers, peer_index, by_addr, primary: primary_list, backup: backup_list, peers, _addrs: addrs, _names: names, points }
    }

    /// The index in `peers` of the peer whose `sockaddr` is `sa` (a pointer nginx's balancer
    /// copied into `pc->sockaddr` from one of this generation's peers), None for any other.
    fn index_of_sockaddr(&self, sa: *const sockaddr) -> Option<usize> {
        let base = self._addrs.as_ptr() as usize;
        let size = core::mem::size_of::<libc::sockaddr_storage>();
        let off = (sa as usize).checked_sub(base)?;
        (off % size == 0 && off / size < self.peers.len()).then_some(off / size)
    }

    /// The passive-health state nginx keeps in `peers[i]`.
    fn fail_state(&self, i: usize) -> FailState {
        let p = &self.peers[i];
        FailState { fails: p.fails as u64, accessed: p.accessed, checked: p.checked }
    }

    /// Sets the passive-health state of the server at `addr`, if this generation has it.
    ///
    /// # Safety
    /// Event loop: nginx's balancers write these fields of our peers the same way, through the
    /// pointers in the lists (never concurrently: one thread).
    unsafe fn set_fail_state(&self, addr: SocketAddr, f: impl FnOnce(FailState) -> FailState) {
        let Some(&i) = self.by_addr.get(&addr) else { return };
        let state = f(self.fail_state(i));
        // SAFETY: contract; `i` is in bounds and `peers` is never resized.
        unsafe {
            let p = (self.peers.as_ptr() as *mut ngx_http_upstream_rr_peer_t).add(i);
            (*p).fails = state.fails as ngx_uint_t;
            (*p).accessed = state.accessed as time_t;
            (*p).checked = state.checked as time_t;
        }
    }

    /// The ring in nginx's layout, for `hcf->points` (null without `hash ... consistent`).
    pub fn points(&self) -> *mut c_void {
        self.points.as_ref().map(|p| p.as_ptr() as *mut c_void).unwrap_or(ptr::null_mut())
    }

    /// Carries the passive-health and rotation state of the servers that stay over from the
    /// list nginx balances now (`old`: nginx's own list from the config, or `previous`, our
    /// generation installed there), so a server that stays keeps its failure count and its
    /// place in the smooth round robin. One hash lookup per server of the old list.
    ///
    /// # Safety
    /// Event loop; `old` null or the valid rr peers list in `us->peer.data` (with its backup
    /// list in `next`); `previous`, when given, is the generation whose `data()` is `old`.
    unsafe fn carry_over(&mut self, old: *const ngx_http_upstream_rr_peers_t, previous: Option<&Generation>) {
        let mut apply = |addr: SocketAddr, c: &ngx_http_upstream_rr_peer_t| {
            if let Some(&i) = self.by_addr.get(&addr) {
                let p = &mut self.peers[i];
                p.current_weight = c.current_weight;
                if c.weight == p.weight {
                    p.effective_weight = c.effective_weight;
                }
                p.fails = c.fails;
                p.accessed = c.accessed;
                p.checked = c.checked;
            }
        };
        match previous {
            Some(g) => {
                for (addr, &i) in &g.by_addr {
                    apply(*addr, &g.peers[i]);
                }
            }
            // SAFETY: contract; nginx's list, walked under its lock when it is in a zone.
            None => unsafe {
                let _lock = PeersReadLock::new(old);
                let mut list = old;
                while !list.is_null() {
                    let mut p = (*list).peer;
                    while !p.is_null() {
                        if let Some(addr) = socket_addr((*p).sockaddr, (*p).socklen) {
                            apply(addr, &*p);
                        }
                        p = (*p).next;
                    }
                    list = (*list).next;
                }
            },
        }
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        // Upstream SSL sessions nginx saved in our peers (proxy_ssl_session_reuse): without a
        // shared zone nginx stores an SSL_SESSION* and expects the list's owner to free it.
        #[cfg(ngx_feature = "http_ssl")]
        for p in self.peers.iter_mut() {
            if !p.ssl_session.is_null() {
                // SAFETY: a non-null ssl_session in a peer without shpool is an SSL_SESSION*
                // nginx got from SSL_get1_session; we own the last reference.
                unsafe { SSL_SESSION_free(p.ssl_session) };
                p.ssl_session = ptr::null_mut();
            }
        }
        let _ = &self.backup;
    }
}

#[cfg(ngx_feature = "http_ssl")]
extern "C" {
    fn SSL_SESSION_free(session: *mut c_void);
}

/// nginx's `ngx_http_upstream_rr_peers_rlock`/`_unlock`: the read lock of a peer list kept in
/// a shared zone (`zone` directive); nothing for per-worker lists (no `shpool`).
pub(super) struct PeersReadLock(*mut ngx_http_upstream_rr_peers_t);

impl PeersReadLock {
    /// # Safety
    /// `peers` null or a valid rr peers list that outlives the lock.
    pub(super) unsafe fn new(peers: *const ngx_http_upstream_rr_peers_t) -> PeersReadLock {
        let peers = peers as *mut ngx_http_upstream_rr_peers_t;
        // SAFETY: contract; rwlock is the list's lock when shpool is set.
        unsafe {
            if !peers.is_null() && !(*peers).shpool.is_null() {
                ngx_rwlock_rlock(&mut (*peers).rwlock);
                return PeersReadLock(peers);
            }
        }
        PeersReadLock(ptr::null_mut())
    }
}

impl Drop for PeersReadLock {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: locked in `new`.
            unsafe { ngx_rwlock_unlock(&mut (*self.0).rwlock) };
        }
    }
}

/// Brings this worker's peers of `srv` up to the shared slot's version. Cheap when nothing
/// changed (one atomic load); otherwise copies the slot's bytes and builds a new generation,
/// here for a small list, on a builder thread for a large one (installed by a later call, at
/// the latest on the next tick: requests meanwhile keep the current list).
///
/// # Safety
/// Worker main thread; `srv` is a synced upstream of the running cycle.
pub unsafe fn sync(srv: &mut SrvConf) {
    let (Some(slot), Some(pool)) = (srv.slot, srv.shpool) else { return };
    if let Some(p) = &srv.building {
        match p.rx.try_recv() {
            Ok(Ok(Prepared(g))) => {
                srv.building = None;
                // SAFETY: contract.
                unsafe { install(srv, g) };
            }
            Ok(Err(e)) => {
                srv.building = None;
                tracing::error!("upstream \"{}\": {e}; keeping the current servers", shm::upstream_name(srv));
            }
            Err(std::sync::mpsc::TryRecvError::Empty) => return,
            Err(std::sync::mpsc::TryRecvError::Disconnected) => srv.building = None,
        }
    }
    // SAFETY: the slot lives in the shared zone for the life of the cycle.
    let v = unsafe { slot.as_ref() }.servers_version.load(core::sync::atomic::Ordering::Acquire);
    if v == srv.local_version {
        return;
    }
    // SAFETY: main thread, zone pointers of this cycle.
    let Some((version, bytes)) = (unsafe { shm::read_servers(pool.as_ptr(), slot.as_ptr()) }) else {
        srv.local_version = v;
        return;
    };
    srv.local_version = version;
    let Some(mut us) = srv.us else { return };
    // SAFETY: `host` of this cycle's upstream conf outlives every generation of the cycle.
    let name: *mut ngx_str_t = unsafe { &mut us.as_mut().host };
    let chash = srv.chash.is_some();
    if bytes.len() <= INLINE_BUILD_MAX_BYTES {
        match crate::model::decode_servers(&bytes) {
            // SAFETY: contract.
            Ok(servers) => unsafe { install(srv, Generation::prepare(servers, name, chash)) },
            Err(e) => tracing::error!("upstream \"{}\": {e}; keeping the current servers", shm::upstream_name(srv)),
        }
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let name = SendPtr(name);
    let build = move || {
        // The workers' event loops come first: on a busy machine the builder takes the CPU
        // they leave (Linux applies the nice value of setpriority(PRIO_PROCESS, 0) to the
        // calling thread only).
        // SAFETY: plain system call on this thread; failure only keeps the default priority.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
        let name = name;
        let _ = tx.send(crate::model::decode_servers(&bytes).map(|servers| Prepared(Generation::prepare(servers, name.0, chash))));
    };
    match super::worker::spawn_without_signals(Box::new(build), "upsync-build") {
        Ok(_) => srv.building = Some(Pending { rx }),
        Err(e) => {
            // Retry on the next call.
            srv.local_version = 0;
            tracing::error!("upstream \"{}\": cannot start a thread to build the new list: {e}", shm::upstream_name(srv));
        }
    }
}

/// The upstream's name pointer, handed to the builder thread, which only stores it.
struct SendPtr(*mut ngx_str_t);
// SAFETY: see `Prepared`: the pointer is never dereferenced off the event loop.
unsafe impl Send for SendPtr {}

/// Installs `g` as the upstream's peer list, carrying over the state of servers that stay.
///
/// # Safety
/// Worker main thread; `srv` is a synced upstream of the running cycle.
unsafe fn install(srv: &mut SrvConf, mut g: Generation) {
    let Some(mut us) = srv.us else { return };
    // SAFETY: contract; us is the upstream conf of this cycle, its peer.data an rr peers list
    // (nginx's or our current generation's).
    unsafe {
        let us = us.as_mut();
        let old = us.peer.data as *const ngx_http_upstream_rr_peers_t;
        let previous = srv.current.as_deref().filter(|c| c.data() as *const ngx_http_upstream_rr_peers_t == old);
        g.carry_over(old, previous);
        us.peer.data = g.data();
        // The ring goes with the peers it names (requests started on the previous list compare
        // server strings, which stay valid while this generation is current).
        if let Some(hcf) = srv.chash {
            (*hcf.as_ptr()).points = g.points();
        }
    }
    srv.current = Some(Rc::new(g));
    srv.fail_epoch_seen = u64::MAX;
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
    // SAFETY: nginx calls peer.init with a valid request and upstream conf on the main thread.
    unsafe {
        let Some(srv) = srv_conf_of(us) else { return NGX_ERROR as ngx_int_t };
        sync(srv);
        if srv.shares_failures {
            apply_shared_failures(srv);
        }
        if let Some(generation) = &srv.current {
            let cln = ngx_pool_cleanup_add((*r).pool, 0);
            if cln.is_null() {
                return NGX_ERROR as ngx_int_t;
            }
            (*cln).handler = Some(release);
            (*cln).data = Rc::into_raw(generation.clone()) as *mut c_void;
        }
        let rc = match srv.original_init_peer {
            Some(init) => init(r, us),
            None => NGX_ERROR as ngx_int_t,
        };
        if rc == NGX_OK as ngx_int_t && srv.shares_failures {
            if let Some(generation) = &srv.current {
                return share_failures_of(r, srv, Rc::as_ptr(generation));
            }
        }
        rc
    }
}

/// Copies the upstream's shared failure table onto this worker's peers when its epoch moved
/// since the last copy (one atomic load otherwise). Servers that left the table (a success
/// after `fail_timeout` cleared them in some worker) get `fails = 0` back.
///
/// # Safety
/// Worker main thread; `srv` is a synced upstream of the running cycle.
unsafe fn apply_shared_failures(srv: &mut SrvConf) {
    let (Some(slot), Some(pool), Some(g)) = (srv.slot, srv.shpool, srv.current.clone()) else { return };
    // SAFETY: the slot lives in the shared zone for the life of the cycle.
    let epoch = unsafe { slot.as_ref() }.fail_epoch.load(core::sync::atomic::Ordering::Acquire);
    if epoch == srv.fail_epoch_seen {
        return;
    }
    // SAFETY: main thread, zone pointers of this cycle.
    let (epoch, entries) = unsafe { shm::read_failures(pool.as_ptr(), slot.as_ptr()) };
    let listed: Vec<SocketAddr> = entries.iter().map(|e| e.addr()).collect();
    for gone in srv.fail_applied.iter().filter(|a| !listed.contains(a)) {
        // SAFETY: event loop (contract).
        unsafe { g.set_fail_state(*gone, |s| FailState { fails: 0, ..s }) };
    }
    for e in &entries {
        // SAFETY: event loop (contract).
        unsafe { g.set_fail_state(e.addr(), |_| e.state) };
    }
    srv.fail_applied = listed;
    srv.fail_epoch_seen = epoch;
}

/// A request's balancer, wrapped to publish what it does to its peers' failure state: nginx's
/// `get`/`free`/session callbacks of the balancer in the upstream (round robin, keepalive,
/// least_conn, hash...) with their data, the upstream, and the generation the request pinned.
struct SharedFails {
    data: *mut c_void,
    get: ngx_event_get_peer_pt,
    free: ngx_event_free_peer_pt,
    set_session: ngx_event_set_peer_session_pt,
    save_session: ngx_event_save_peer_session_pt,
    srv: *mut SrvConf,
    generation: *const Generation,
}

/// Puts [`SharedFails`] between nginx and the balancer of request `r` (as nginx's keepalive
/// module puts itself between nginx and round robin).
///
/// # Safety
/// Main thread, right after the balancer's `peer.init` succeeded for `r`; `generation` is pinned
/// by `r`'s pool (see `release`).
unsafe fn share_failures_of(r: *mut ngx_http_request_t, srv: &mut SrvConf, generation: *const Generation) -> ngx_int_t {
    // SAFETY: contract; `r->upstream` is set before peer.init, its pool outlives the request's
    // upstream work, and SharedFails is plain data (no destructor needed).
    unsafe {
        let pc = &mut (*(*r).upstream).peer;
        let ctx = ngx_palloc((*r).pool, core::mem::size_of::<SharedFails>()) as *mut SharedFails;
        if ctx.is_null() {
            return NGX_ERROR as ngx_int_t;
        }
        ctx.write(SharedFails {
            data: pc.data,
            get: pc.get,
            free: pc.free,
            set_session: pc.set_session,
            save_session: pc.save_session,
            srv,
            generation,
        });
        pc.data = ctx as *mut c_void;
        pc.get = Some(shared_get);
        pc.free = Some(shared_free);
        if pc.set_session.is_some() {
            pc.set_session = Some(shared_set_session);
        }
        if pc.save_session.is_some() {
            pc.save_session = Some(shared_save_session);
        }
    }
    NGX_OK as ngx_int_t
}

unsafe extern "C" fn shared_get(pc: *mut ngx_peer_connection_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: `data` is the SharedFails set by share_failures_of for this connection.
    super::guard("the upstream peer get", NGX_ERROR as ngx_int_t, || unsafe {
        let ctx = &*(data as *const SharedFails);
        match ctx.get {
            Some(get) => get(pc, ctx.data),
            None => NGX_ERROR as ngx_int_t,
        }
    })
}

/// The balancer's `free`, then, when it changed the failure state of the peer the request used,
/// that state into the shared table.
unsafe extern "C" fn shared_free(pc: *mut ngx_peer_connection_t, data: *mut c_void, state: ngx_uint_t) {
    // SAFETY: `data` is the SharedFails set by share_failures_of; its generation is pinned by
    // the request and its srv conf lives for the cycle; event loop.
    super::guard("the upstream peer free", (), || unsafe {
        let ctx = &*(data as *const SharedFails);
        let g = &*ctx.generation;
        let used = g.index_of_sockaddr((*pc).sockaddr);
        let before = used.map(|i| g.fail_state(i));
        if let Some(free) = ctx.free {
            free(pc, ctx.data, state);
        }
        let (Some(i), Some(before)) = (used, before) else { return };
        let after = g.fail_state(i);
        if after == before {
            return;
        }
        let srv = &mut *ctx.srv;
        let (Some(slot), Some(pool)) = (srv.slot, srv.shpool) else { return };
        let Some(addr) = socket_addr((*pc).sockaddr, (*pc).socklen) else { return };
        let current = srv.current.clone();
        let listed = |a: SocketAddr| current.as_ref().is_none_or(|c| c.by_addr.contains_key(&a));
        if let Err(e) = shm::record_failure(pool.as_ptr(), slot.as_ptr(), addr, after, listed) {
            tracing::error!("upstream \"{}\": {e}", shm::upstream_name(srv));
        }
    })
}

unsafe extern "C" fn shared_set_session(pc: *mut ngx_peer_connection_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: `data` is the SharedFails set by share_failures_of; set only when the balancer has
    // its own set_session.
    super::guard("the upstream peer set_session", NGX_ERROR as ngx_int_t, || unsafe {
        let ctx = &*(data as *const SharedFails);
        ctx.set_session.map(|f| f(pc, ctx.data)).unwrap_or(NGX_OK as ngx_int_t)
    })
}

unsafe extern "C" fn shared_save_session(pc: *mut ngx_peer_connection_t, data: *mut c_void) {
    // SAFETY: as shared_set_session.
    super::guard("the upstream peer save_session", (), || unsafe {
        let ctx = &*(data as *const SharedFails);
        if let Some(f) = ctx.save_session {
            f(pc, ctx.data);
        }
    })
}

/// Pool cleanup: the request no longer uses its generation.
unsafe extern "C" fn release(data: *mut c_void) {
    // SAFETY: data is the Rc::into_raw of init_peer, released exactly once by nginx.
    super::guard("releasing a peer list", (), || drop(unsafe { Rc::from_raw(data as *const Generation) }));
}
