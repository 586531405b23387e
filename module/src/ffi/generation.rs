//! Synced servers as nginx round-robin peers, for the HTTP and the stream module alike.
//!
//! We never edit nginx's peer lists in place (nginx-upsync-module does, and frees removed peers
//! after a 30-minute timer). Each new server list becomes a new, immutable-shaped
//! [`Generation`] of nginx's rr peers structs, installed in `us->peer.data` by a plain pointer
//! store on the worker's main thread. nginx's own round-robin code (and keepalive, least_conn,
//! ip_hash, hash, which call it) then balances over it exactly as over a static list: smooth
//! weighted round robin, max_fails/fail_timeout, down, backup, next-upstream retries.
//!
//! Every request (HTTP) or session (stream) that starts on a generation holds an `Rc` to it
//! until its pool is destroyed, so a removed server's memory is released when its last request
//! ends, not after a timer.
//!
//! This file is compiled into both modules (the stream glue includes it by path, as `common.rs`).
//! nginx's HTTP and stream rr peer structs have the same field names, so one source serves both:
//! each glue's `peers.rs` names its structs `RrPeer`/`RrPeers` (and its `hash` module's conf) and
//! keeps only what differs, the `peer.init` wrapper. What needs no nginx struct (peer order,
//! backup split, placeholder, weights, tries, ring) is planned in [`crate::peerplan`].
use core::ffi::c_void;
use core::ptr;
use std::net::SocketAddr;
use std::rc::Rc;

use ngx::ffi::*;

use super::addr::{sockaddr, socket_addr};
use super::peers::{RrPeer, RrPeers};
use super::{shm, SrvConf};
use crate::fails::FailState;
use crate::model::Server;
use crate::peerplan::{self, AddrIndex};

/// Lists whose encoded form is at most this many bytes (about 2,500 IPv4 servers, a millisecond
/// or two of work) are built on the event loop when a request or the tick first needs them;
/// larger ones on a short-lived thread, so a change in an upstream of 50,000 servers costs the
/// event loop only the carry-over of the per-peer state (one hash lookup per server).
const INLINE_BUILD_MAX_BYTES: usize = 32 * 1024;

/// One installed peer list and everything it points to.
pub struct Generation {
    /// The list as synced (for upstream_show); excludes the placeholder of an empty list.
    pub servers: Vec<Server>,
    primary: Box<RrPeers>,
    backup: Option<Box<RrPeers>>,
    /// Primary peers first, then backup peers; linked with `next` inside each list. Never
    /// resized after construction (nginx holds pointers into it).
    peers: Box<[RrPeer]>,
    /// For `servers[i]`, its index in `peers`.
    peer_index: Vec<usize>,
    /// Address -> index in `peers` (built with the generation, used to carry state over).
    by_addr: AddrIndex,
    _addrs: Box<[libc::sockaddr_storage]>,
    _names: Box<[u8]>,
    /// With `hash KEY consistent`: the ring in the layout of nginx's
    /// `ngx_{http,stream}_upstream_chash_points_t` (`number`, then `{uint32 hash; ngx_str_t
    /// *server}` points naming this generation's peers), installed in the hash module's conf
    /// with the generation. Words: the header, then two per point.
    points: Option<Box<[u64]>>,
}

/// The consistent-hash ring of `plan`'s primary peers, laid out as nginx's
/// `ngx_{http,stream}_upstream_chash_points_t`; the points name the peers' `server` strings.
fn ring_points(plan: &peerplan::Plan, peers: &mut [RrPeer]) -> Box<[u64]> {
    let ring = plan.ring();
    let mut words = vec![0u64; 1 + 2 * ring.len()].into_boxed_slice();
    let base = words.as_mut_ptr();
    // SAFETY: `words` has room for the header word and 2 words (16 bytes, the size and 8-byte
    // alignment of ChashPoint) per point; the server pointers point into `peers`, which the
    // generation owns and never resizes; `p.server` is the index of a primary peer.
    unsafe {
        *(base as *mut ngx_uint_t) = ring.len() as ngx_uint_t;
        let points = base.add(1) as *mut ChashPoint;
        for (i, p) in ring.iter().enumerate() {
            points.add(i).write(ChashPoint { hash: p.hash, server: &mut peers[p.server].server });
        }
    }
    words
}

/// One point of nginx's consistent-hash ring (`ngx_{http,stream}_upstream_chash_point_t`).
#[repr(C)]
struct ChashPoint {
    hash: u32,
    server: *mut ngx_str_t,
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
        &*self.primary as *const RrPeers as *mut c_void
    }

    /// `(fails, active requests or connections)` this worker counts for `servers[i]`.
    pub fn peer_state(&self, i: usize) -> (u64, u64) {
        let p = &self.peers[self.peer_index[i]];
        (p.fails as u64, p.conns as u64)
    }

    /// Builds a generation for `servers` with fresh per-peer state. Touches no nginx memory
    /// (`name` is only stored), so it may run on any thread; [`Generation::carry_over`] then
    /// brings the state of servers that stay, on the event loop.
    fn prepare(servers: Vec<Server>, name: *mut ngx_str_t, chash: bool) -> Generation {
        let plan = peerplan::plan(&servers);
        let mut names = plan.names.clone().into_boxed_slice();
        let mut addrs: Box<[libc::sockaddr_storage]> = plan.peers.iter().map(|p| sockaddr(&p.addr).0).collect();
        // SAFETY: nginx's rr peer struct is a C struct of integers and pointers; all-zero is its
        // "unset" state (nginx itself pcallocs peers). From nginx 1.27.3 on, that also means
        // `refs` 0, not a `zombie`, and no `host` (not a peer of nginx's `resolve`).
        let mut peers: Box<[RrPeer]> = (0..plan.peers.len()).map(|_| unsafe { core::mem::zeroed() }).collect();
        let base = peers.as_mut_ptr();
        for (i, pp) in plan.peers.iter().enumerate() {
            let p = &mut peers[i];
            p.sockaddr = &mut addrs[i] as *mut libc::sockaddr_storage as *mut sockaddr;
            p.socklen = sockaddr(&pp.addr).1;
            // SAFETY: names is not resized after this point; the span is inside it.
            p.name = ngx_str_t { len: pp.name.1, data: unsafe { names.as_mut_ptr().add(pp.name.0) } };
            p.server = p.name;
            p.weight = pp.weight as ngx_int_t;
            p.effective_weight = p.weight;
            p.max_fails = pp.max_fails as ngx_uint_t;
            p.fail_timeout = pp.fail_timeout as time_t;
            p.down = pp.down as ngx_uint_t;
            // SAFETY: i + 1 < len when the peer is not the last of its list; never resized.
            p.next = if pp.last_of_list { ptr::null_mut() } else { unsafe { base.add(i + 1) } };
        }
        let list = |l: &peerplan::ListPlan| -> Box<RrPeers> {
            // SAFETY: as above, zero is the unset state of the C struct (no shpool: not in a
            // zone; from nginx 1.27.3 on: `config` null, so nginx never rebuilds a hash ring from
            // it, and no `resolve` peers).
            let mut r: Box<RrPeers> = Box::new(unsafe { core::mem::zeroed() });
            r.number = l.number as ngx_uint_t;
            r.total_weight = l.total_weight as ngx_uint_t;
            r.tries = l.tries as ngx_uint_t;
            r.set_weighted(l.weighted as u32);
            r.set_single(l.single as u32);
            r.name = name;
            // SAFETY: first < len; peers is never resized.
            r.peer = unsafe { base.add(l.first) };
            r
        };
        let mut primary = list(&plan.primary);
        let backup = plan.backup.as_ref().map(list);
        if let Some(b) = &backup {
            primary.next = &**b as *const RrPeers as *mut _;
        }
        let points = chash.then(|| ring_points(&plan, &mut peers));
        let peerplan::Plan { peer_index, by_addr, .. } = plan;
        Generation { servers, peer_index, by_addr, primary, backup, peers, _addrs: addrs, _names: names, points }
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
            let p = (self.peers.as_ptr() as *mut RrPeer).add(i);
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
    unsafe fn carry_over(&mut self, old: *const RrPeers, previous: Option<&Generation>) {
        let mut apply = |addr: SocketAddr, c: &RrPeer| {
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
        #[cfg(any(all(not(upsync_stream), ngx_feature = "http_ssl"), all(upsync_stream, ngx_feature = "stream_ssl")))]
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

#[cfg(any(all(not(upsync_stream), ngx_feature = "http_ssl"), all(upsync_stream, ngx_feature = "stream_ssl")))]
extern "C" {
    fn SSL_SESSION_free(session: *mut c_void);
}

/// nginx's `ngx_{http,stream}_upstream_rr_peers_rlock`/`_unlock`: the read lock of a peer list
/// kept in a shared zone (`zone` directive); nothing for per-worker lists (no `shpool`).
pub struct PeersReadLock(*mut RrPeers);

impl PeersReadLock {
    /// # Safety
    /// `peers` null or a valid rr peers list that outlives the lock.
    pub unsafe fn new(peers: *const RrPeers) -> PeersReadLock {
        let peers = peers as *mut RrPeers;
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
#[inline]
pub unsafe fn sync(srv: &mut SrvConf) {
    if srv.building.is_none() {
        let Some(slot) = srv.slot else { return };
        // SAFETY: the slot lives in the shared zone for the life of the cycle.
        let v = unsafe { slot.as_ref() }.servers_version.load(core::sync::atomic::Ordering::Acquire);
        if v == srv.local_version {
            return;
        }
    }
    // SAFETY: contract.
    unsafe { sync_changed(srv) }
}

/// [`sync`] once the slot's version moved or a build is pending.
///
/// # Safety
/// As [`sync`].
#[inline(never)]
unsafe fn sync_changed(srv: &mut SrvConf) {
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
    // (nginx's or our current generation's); `chash` is its hash module's conf.
    unsafe {
        let us = us.as_mut();
        let old = us.peer.data as *const RrPeers;
        let previous = srv.current.as_deref().filter(|c| c.data() as *const RrPeers == old);
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

/// The first half of a synced upstream's `peer.init`, before the balancer's own init: catch up
/// with the shared list and the shared failure table, then pin the current generation to `pool`
/// (the request's or the session's) until it is destroyed. Returns the pinned generation (None:
/// nginx's own list from the config is still in use), or Err when the pool has no memory.
///
/// # Safety
/// Worker main thread; `srv` is a synced upstream of the running cycle; `pool` the pool of a
/// request or session starting on it.
#[inline]
pub(super) unsafe fn start(srv: &mut SrvConf, pool: *mut ngx_pool_t) -> Result<Option<*const Generation>, ()> {
    // SAFETY: contract.
    unsafe {
        sync(srv);
        if srv.shares_failures {
            apply_shared_failures(srv);
        }
        let Some(generation) = &srv.current else { return Ok(None) };
        let cln = ngx_pool_cleanup_add(pool, 0);
        if cln.is_null() {
            return Err(());
        }
        (*cln).handler = Some(release);
        (*cln).data = Rc::into_raw(generation.clone()) as *mut c_void;
        Ok(Some(Rc::as_ptr(generation)))
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
/// `get`/`free`/`notify`/session callbacks of the balancer in the upstream (round robin,
/// keepalive, least_conn, hash...) with their data, the upstream, and the generation the request
/// pinned. (`notify`: stream round robin clears a peer's failures when a connection to it
/// succeeds.)
struct SharedFails {
    data: *mut c_void,
    get: ngx_event_get_peer_pt,
    free: ngx_event_free_peer_pt,
    notify: ngx_event_notify_peer_pt,
    set_session: ngx_event_set_peer_session_pt,
    save_session: ngx_event_save_peer_session_pt,
    srv: *mut SrvConf,
    generation: *const Generation,
}

/// Puts [`SharedFails`] between nginx and the balancer of a request or session (as nginx's
/// keepalive module puts itself between nginx and round robin): `pc` is its peer connection,
/// `pool` its pool.
///
/// # Safety
/// Main thread, right after the balancer's `peer.init` succeeded; `generation` is pinned by
/// `pool` (see [`start`]), which outlives `pc`'s use.
pub(super) unsafe fn share_failures_of(
    pc: &mut ngx_peer_connection_t,
    pool: *mut ngx_pool_t,
    srv: &mut SrvConf,
    generation: *const Generation,
) -> ngx_int_t {
    // SAFETY: contract; SharedFails is plain data (no destructor needed).
    unsafe {
        let ctx = ngx_palloc(pool, core::mem::size_of::<SharedFails>()) as *mut SharedFails;
        if ctx.is_null() {
            return NGX_ERROR as ngx_int_t;
        }
        ctx.write(SharedFails {
            data: pc.data,
            get: pc.get,
            free: pc.free,
            notify: pc.notify,
            set_session: pc.set_session,
            save_session: pc.save_session,
            srv,
            generation,
        });
        pc.data = ctx as *mut c_void;
        pc.get = Some(shared_get);
        pc.free = Some(shared_free);
        if pc.notify.is_some() {
            pc.notify = Some(shared_notify);
        }
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
    // SAFETY: `data` is the SharedFails set by share_failures_of; nginx's arguments.
    super::guard("the upstream peer free", (), || unsafe {
        let ctx = &*(data as *const SharedFails);
        publish_failures_of(pc, ctx, || {
            if let Some(free) = ctx.free {
                free(pc, ctx.data, state);
            }
        })
    })
}

/// The balancer's `notify` (stream: a connection to the peer succeeded), then, when it changed
/// the peer's failure state, that state into the shared table.
unsafe extern "C" fn shared_notify(pc: *mut ngx_peer_connection_t, data: *mut c_void, kind: ngx_uint_t) {
    // SAFETY: `data` is the SharedFails set by share_failures_of (set only when the balancer has
    // its own notify); nginx's arguments.
    super::guard("the upstream peer notify", (), || unsafe {
        let ctx = &*(data as *const SharedFails);
        publish_failures_of(pc, ctx, || {
            if let Some(notify) = ctx.notify {
                notify(pc, ctx.data, kind);
            }
        })
    })
}

/// Runs `callback` (the balancer's), then records the failure state of the peer `pc` used in the
/// shared table if the callback changed it.
///
/// # Safety
/// Event loop; `pc` is the peer connection `ctx` wraps; `ctx`'s generation is pinned by the
/// request and its srv conf lives for the cycle.
unsafe fn publish_failures_of(pc: *mut ngx_peer_connection_t, ctx: &SharedFails, callback: impl FnOnce()) {
    // SAFETY: contract.
    unsafe {
        let g = &*ctx.generation;
        let used = g.index_of_sockaddr((*pc).sockaddr);
        let before = used.map(|i| g.fail_state(i));
        callback();
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
    }
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

/// Pool cleanup: the request or session no longer uses its generation.
unsafe extern "C" fn release(data: *mut c_void) {
    // SAFETY: data is the Rc::into_raw of `start`, released exactly once by nginx.
    super::guard("releasing a peer list", (), || drop(unsafe { Rc::from_raw(data as *const Generation) }));
}
