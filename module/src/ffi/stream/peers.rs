//! Synced servers as nginx stream round-robin peers: the stream counterpart of the HTTP
//! module's `ffi/peers.rs`, with the same design. Each new list becomes a new
//! [`Generation`] of `ngx_stream_upstream_rr_peers_t`, installed in `us->peer.data` by a pointer
//! store on the worker's main thread; nginx's own stream round robin (and least_conn, hash)
//! balances over it. Every session that starts on a generation holds an `Rc` to it until its
//! connection's pool is destroyed, so an established connection to a removed server keeps its
//! peer until it closes.
use core::ffi::c_void;
use core::ptr;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;

use ngx::ffi::*;

use super::addr::{sockaddr, socket_addr};
use super::{shm, srv_conf_of, SrvConf};
use crate::model::Server;

type AddrIndex = HashMap<SocketAddr, usize, fnv::FnvBuildHasher>;

/// One installed peer list and everything it points to.
pub struct Generation {
    /// The list as synced (for upstream_show); excludes the placeholder of an empty list.
    pub servers: Vec<Server>,
    primary: Box<ngx_stream_upstream_rr_peers_t>,
    _backup: Option<Box<ngx_stream_upstream_rr_peers_t>>,
    /// Primary peers first, then backup peers; never resized (nginx holds pointers into it).
    peers: Box<[ngx_stream_upstream_rr_peer_t]>,
    /// For `servers[i]`, its index in `peers`.
    peer_index: Vec<usize>,
    by_addr: AddrIndex,
    _addrs: Box<[libc::sockaddr_storage]>,
    _names: Box<[u8]>,
}

impl Generation {
    /// The pointer nginx's balancers read from `us->peer.data`.
    pub fn data(&self) -> *mut c_void {
        &*self.primary as *const ngx_stream_upstream_rr_peers_t as *mut c_void
    }

    /// `(fails, active connections)` this worker counts for `servers[i]`.
    pub fn peer_state(&self, i: usize) -> (u64, u64) {
        let p = &self.peers[self.peer_index[i]];
        (p.fails as u64, p.conns as u64)
    }

    /// A generation for `servers` with fresh per-peer state: peers sorted by address (the same
    /// order on every nginx instance, for `hash`), backup servers in a second list, an empty
    /// primary list replaced by one placeholder marked down.
    fn prepare(servers: Vec<Server>, name: *mut ngx_str_t) -> Generation {
        let mut primary_servers: Vec<&Server> = servers.iter().filter(|s| !s.backup).collect();
        let mut backup_servers: Vec<&Server> = servers.iter().filter(|s| s.backup).collect();
        primary_servers.sort_by_key(|s| s.addr);
        backup_servers.sort_by_key(|s| s.addr);
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
        // SAFETY: ngx_stream_upstream_rr_peer_t is a C struct of integers and pointers; all-zero
        // is its unset state (nginx pcallocs peers).
        let mut peers: Box<[ngx_stream_upstream_rr_peer_t]> = (0..all.len()).map(|_| unsafe { core::mem::zeroed() }).collect();
        let mut by_addr = AddrIndex::with_capacity_and_hasher(all.len(), Default::default());
        for (i, s) in all.iter().enumerate() {
            let p = &mut peers[i];
            p.sockaddr = &mut addrs[i] as *mut libc::sockaddr_storage as *mut sockaddr;
            p.socklen = sockaddr(&s.addr).1;
            // SAFETY: names is not resized after this point; the span is inside it.
            p.name = ngx_str_t { len: spans[i].1, data: unsafe { names.as_mut_ptr().add(spans[i].0) } };
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
        for i in 0..all.len() {
            let last_of_list = i + 1 == np || i + 1 == all.len();
            peers[i].next = if last_of_list { ptr::null_mut() } else { &mut peers[i + 1] as *mut _ };
        }
        let base = peers.as_mut_ptr();
        let list = |first: usize, n: usize| -> Box<ngx_stream_upstream_rr_peers_t> {
            // SAFETY: zero is the unset state of the C struct (no shpool: not in a zone).
            let mut l: Box<ngx_stream_upstream_rr_peers_t> = Box::new(unsafe { core::mem::zeroed() });
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
            primary_list.next = &**b as *const ngx_stream_upstream_rr_peers_t as *mut _;
        }
        let peer_index = servers.iter().map(|s| by_addr.get(&s.addr).copied().unwrap_or(0)).collect();
        drop(all);
        drop(primary);
        drop(backup_servers);
        Generation { servers, peer_index, by_addr, primary: primary_list, _backup: backup_list, peers, _addrs: addrs, _names: names }
    }

    /// Carries the passive-health and rotation state of the servers that stay over from the
    /// list nginx balances now (`old`: nginx's own list from the config, or `previous`).
    ///
    /// # Safety
    /// Event loop; `old` null or the valid rr peers list in `us->peer.data`; `previous`, when
    /// given, is the generation whose `data()` is `old`.
    unsafe fn carry_over(&mut self, old: *const ngx_stream_upstream_rr_peers_t, previous: Option<&Generation>) {
        let mut apply = |addr: SocketAddr, c: &ngx_stream_upstream_rr_peer_t| {
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
            // SAFETY: contract; nginx's own list of a block without `zone` (with `zone` its
            // peers live in shared memory and are read the same way, their fields are plain).
            None => unsafe {
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

/// Brings this worker's peers of `srv` up to the shared slot's version (one atomic load when
/// nothing changed).
///
/// # Safety
/// Worker main thread; `srv` is a synced upstream of the running cycle.
pub unsafe fn sync(srv: &mut SrvConf) {
    let (Some(slot), Some(pool)) = (srv.slot, srv.shpool) else { return };
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
    match crate::model::decode_servers(&bytes) {
        // SAFETY: contract.
        Ok(servers) => unsafe { install(srv, Generation::prepare(servers, name)) },
        Err(e) => tracing::error!("upstream \"{}\": {e}; keeping the current servers", shm::upstream_name(srv)),
    }
}

/// Installs `g` as the upstream's peer list, carrying over the state of servers that stay.
///
/// # Safety
/// Worker main thread; `srv` is a synced upstream of the running cycle.
unsafe fn install(srv: &mut SrvConf, mut g: Generation) {
    let Some(mut us) = srv.us else { return };
    // SAFETY: contract; us is the upstream conf of this cycle, its peer.data an rr peers list.
    unsafe {
        let us = us.as_mut();
        let old = us.peer.data as *const ngx_stream_upstream_rr_peers_t;
        let previous = srv.current.as_deref().filter(|c| c.data() as *const ngx_stream_upstream_rr_peers_t == old);
        g.carry_over(old, previous);
        us.peer.data = g.data();
    }
    srv.current = Some(Rc::new(g));
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
    // SAFETY: contract; the session's connection pool lives as long as the session.
    unsafe {
        let Some(srv) = srv_conf_of(us) else { return NGX_ERROR as ngx_int_t };
        sync(srv);
        if let Some(generation) = &srv.current {
            let cln = ngx_pool_cleanup_add((*(*s).connection).pool, 0);
            if cln.is_null() {
                return NGX_ERROR as ngx_int_t;
            }
            (*cln).handler = Some(release);
            (*cln).data = Rc::into_raw(generation.clone()) as *mut c_void;
        }
        match srv.original_init_peer {
            Some(init) => init(s, us),
            None => NGX_ERROR as ngx_int_t,
        }
    }
}

/// Pool cleanup: the session no longer uses its generation.
unsafe extern "C" fn release(data: *mut c_void) {
    // SAFETY: data is the Rc::into_raw of init_peer, released exactly once by nginx.
    super::guard("releasing a peer list", (), || drop(unsafe { Rc::from_raw(data as *const Generation) }));
}
