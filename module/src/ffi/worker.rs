//! Per-worker lifecycle: a tick timer that renews or contends for the leader lease and keeps the
//! worker's peers in step with the shared slots; in the leader, the poller thread and the socket
//! through which it wakes the event loop.
//!
//! How one poll per nginx instance works: see `module/README.md`. In short: the lease (PID,
//! generation, heartbeat) is in the shared zone; on every tick a worker renews it (leader),
//! takes it with a compare-and-swap when it is vacant (no leader, leader PID gone, heartbeat
//! stale, or leader from an older configuration), or follows. The leader's poller thread holds
//! one blocking query per upstream; results come back to the leader's event loop, which writes
//! the slots. Every worker (leader included) installs a slot's list when its version moves, at
//! the latest on its next request to that upstream.
use core::ffi::c_void;
use core::ptr;
use std::cell::RefCell;
use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use ngx::ffi::*;

use super::{cycle_main_conf, guard, log, main_conf_of, peers, shm, MainConf, SrvConf};
use crate::lease::{self, Decision, Lease, Me};
use crate::model::{decode_servers, unix_ms, Origin, Server, SlotMeta, WatchHealth};
use crate::poller::{DumpRequest, Mailbox, Poller, Update, WatchSpec};

/// How often a worker looks at the lease and the slots.
const TICK_MS: ngx_msec_t = 200;

struct Worker {
    main: *mut MainConf,
    /// Owns the timer event nginx holds a pointer to.
    _tick: Box<ngx_event_t>,
    /// The tick's `data`: nginx's debug logging of timers reads `ev->data` as a connection and
    /// prints its fd, so a timer without a connection needs a stand-in with `fd = -1`.
    _dummy: Box<ngx_connection_t>,
    leader: Option<Leadership>,
}

/// What the leader knows of one upstream's slot (index = position in MainConf::upstreams).
struct LeaderSlot {
    /// The list installed in the slot (what every worker serves).
    servers: Arc<Vec<Server>>,
    meta: SlotMeta,
}

/// What the leader runs.
struct Leadership {
    poller: Poller,
    /// The socket the poller writes to, registered in nginx's event loop.
    wake: *mut ngx_connection_t,
    slots: Vec<LeaderSlot>,
}

thread_local! {
    // Only the worker's main thread (nginx's event loop) touches this.
    static WORKER: RefCell<Option<Worker>> = const { RefCell::new(None) };
}

/// `init_module`, in the master once nginx has initialised the whole new cycle (after every
/// step that can fail: listening sockets, files, shared zones): commits the configuration's
/// generation, so its workers take over the Consul watches. A reload that fails before this
/// point leaves the running workers leading.
pub unsafe extern "C" fn init_module(cycle: *mut ngx_cycle_t) -> ngx_int_t {
    guard("init_module", NGX_OK as ngx_int_t, || {
        // SAFETY: nginx passes the cycle being initialised, on the master's main thread.
        if let Some(main) = unsafe { main_conf_of(cycle) } {
            if !main.header.is_null() {
                // SAFETY: the header was set by this cycle's zone init.
                unsafe { shm::commit(main.header, main.generation) };
            }
        }
        NGX_OK as ngx_int_t
    })
}

pub unsafe extern "C" fn init_process(cycle: *mut ngx_cycle_t) -> ngx_int_t {
    guard("init_process", NGX_OK as ngx_int_t, || {
        // SAFETY: called by nginx on the new process's main thread with the running cycle.
        unsafe { start_worker(cycle) };
        NGX_OK as ngx_int_t
    })
}

/// # Safety
/// The new process's main thread, `cycle` the running cycle.
unsafe fn start_worker(cycle: *mut ngx_cycle_t) {
    // SAFETY: a plain read of nginx's global on the main thread.
    let process = unsafe { ngx_process };
    if process != NGX_PROCESS_WORKER as ngx_uint_t && process != NGX_PROCESS_SINGLE as ngx_uint_t {
        return;
    }
    // SAFETY: contract: the running cycle, whose log nginx set up.
    let log = unsafe { (*cycle).log };
    // SAFETY: as above.
    log::set_level(unsafe { (*log).log_level });
    // SAFETY: main thread.
    let Some(main) = (unsafe { cycle_main_conf() }) else { return };
    if main.upstreams.is_empty() || main.header.is_null() {
        return;
    }
    // SAFETY: worker main thread; main of the running cycle with a header.
    unsafe { shm::register_worker(main) };
    // SAFETY: all-zero is the unset state of these C structs.
    let (mut dummy, mut tick): (Box<ngx_connection_t>, Box<ngx_event_t>) =
        unsafe { (Box::new(core::mem::zeroed()), Box::new(core::mem::zeroed())) };
    dummy.fd = -1;
    tick.handler = Some(on_tick);
    tick.log = log;
    tick.data = &mut *dummy as *mut ngx_connection_t as *mut c_void;
    // A cancelable timer never keeps a shutting-down worker alive.
    tick.set_cancelable(1);
    let tick_ptr: *mut ngx_event_t = &mut *tick;
    WORKER.with(|w| *w.borrow_mut() = Some(Worker { main, _tick: tick, _dummy: dummy, leader: None }));
    // First tick right away: a new worker takes a vacant lease (e.g. after a reload) at once.
    // SAFETY: the event lives in the Worker until exit_process; main thread.
    unsafe { nginx_sys::ngx_add_timer(tick_ptr, 1) };
}

pub unsafe extern "C" fn exit_process(_cycle: *mut ngx_cycle_t) {
    guard("exit_process", (), || {
        // Before nginx checks for open sockets: stop the poller and close our socket.
        let worker = WORKER.with(|w| w.borrow_mut().take());
        if let Some(mut w) = worker {
            // SAFETY: main thread; the worker's main conf belongs to the running cycle.
            unsafe {
                stop_leading(&mut w, true);
                shm::unregister_worker(&*w.main);
            }
        }
        log::drain();
    })
}

fn exiting() -> bool {
    // SAFETY: plain reads of nginx's process-state globals on the main thread.
    unsafe { ngx_exiting != 0 || ngx_quit != 0 || ngx_terminate != 0 }
}

unsafe extern "C" fn on_tick(ev: *mut ngx_event_t) {
    guard("the tick", (), || {
        log::drain();
        WORKER.with(|cell| {
            let mut guard = cell.borrow_mut();
            let Some(w) = guard.as_mut() else { return };
            // SAFETY: main thread; main conf and header belong to this worker's cycle.
            unsafe {
                tick(w);
                let main = &mut *w.main;
                for &srv in &main.upstreams {
                    peers::sync(&mut *srv);
                }
            }
        });
    });
    if !exiting() {
        // SAFETY: the tick event lives in the Worker, which lives until exit_process.
        unsafe { nginx_sys::ngx_add_timer(ev, TICK_MS) };
    }
}

/// One lease decision, taken and written under the zone's mutex (pid, generation and heartbeat
/// change together); starting or stopping the poller happens after, outside the lock.
///
/// # Safety
/// Main thread, `w.main` of the running cycle.
unsafe fn tick(w: &mut Worker) {
    // SAFETY: contract.
    let main = unsafe { &mut *w.main };
    let pid = std::process::id() as i64;
    // SAFETY: ngx_current_msec is updated by nginx's event loop on this thread.
    let now = unsafe { ngx_current_msec } as u64;
    // SAFETY: header is in the shared zone mapped for the life of the process.
    let committed = unsafe { (*main.header).committed_generation.load(core::sync::atomic::Ordering::Acquire) };
    let generation = main.generation;
    let is_exiting = exiting();
    let decide = |lease: Lease| {
        let me = Me {
            pid,
            generation,
            current_generation: committed,
            exiting: is_exiting,
            now_ms: now,
            leader_alive: lease.leader_pid == 0 || shm::process_exists(lease.leader_pid),
        };
        let d = lease::decide(lease, me);
        let mine = Lease { leader_pid: pid, leader_generation: generation, heartbeat_ms: now };
        let new = match d {
            Decision::Renew | Decision::Acquire => Some(mine),
            Decision::Release => Some(Lease { leader_pid: 0, leader_generation: 0, heartbeat_ms: 0 }),
            Decision::Follow => None,
        };
        ((d, lease.leader_pid), new)
    };
    // SAFETY: main thread, header of the running cycle.
    let (decision, previous) = unsafe { shm::update_lease(main, decide) };
    match decision {
        Decision::Renew => {
            let dead = w.leader.as_ref().is_some_and(|l| l.poller.is_finished());
            if w.leader.is_none() || dead {
                if dead {
                    tracing::error!("the Consul poller thread stopped unexpectedly; restarting it");
                }
                // SAFETY: main thread.
                unsafe { stop_leading(w, false) };
                // SAFETY: main thread.
                unsafe { start_leading(w) };
            }
        }
        Decision::Release => {
            // The lease is already cleared.
            // SAFETY: main thread.
            unsafe { stop_leading(w, false) };
            tracing::info!("worker {pid} released the Consul watches");
        }
        Decision::Acquire => {
            if previous != 0 {
                tracing::info!("took over the Consul watches from worker {previous} (gone, stuck or from an older configuration)");
            }
            // SAFETY: main thread.
            unsafe { stop_leading(w, false) };
            // SAFETY: main thread.
            unsafe { start_leading(w) };
        }
        Decision::Follow => {
            if w.leader.is_some() {
                // Another worker holds the lease now (we were stuck past the timeout).
                // SAFETY: main thread.
                unsafe { stop_leading(w, false) };
            }
        }
    }
}

/// Starts the poller thread and its wake-up socket.
///
/// # Safety
/// Main thread; `w.main` of the running cycle.
unsafe fn start_leading(w: &mut Worker) {
    // SAFETY: contract.
    let main = unsafe { &mut *w.main };
    let pool = shm::pool_of(main);
    let mut slots = Vec::with_capacity(main.upstreams.len());
    let mut specs = Vec::with_capacity(main.upstreams.len());
    for (id, &srv) in main.upstreams.iter().enumerate() {
        // SAFETY: srv is a synced upstream conf of this cycle.
        let srv: &SrvConf = unsafe { &*srv };
        let (meta, servers) = match srv.slot {
            Some(s) => {
                // SAFETY: main thread, zone pointers of this cycle.
                let (_, meta) = unsafe { shm::read_meta(pool, s.as_ptr()) };
                // SAFETY: as above.
                let servers = unsafe { shm::read_servers(pool, s.as_ptr()) }.and_then(|(_, b)| decode_servers(&b).ok()).unwrap_or_default();
                (meta, servers)
            }
            None => (SlotMeta::default(), Vec::new()),
        };
        specs.push(WatchSpec {
            id,
            upstream: shm::upstream_name(srv),
            sync: srv.sync.clone(),
            known: (meta.origin == Origin::Consul).then(|| servers.clone()),
        });
        slots.push(LeaderSlot { servers: Arc::new(servers), meta });
    }
    let (rx, tx) = match UnixStream::pair().and_then(|(rx, tx)| {
        rx.set_nonblocking(true)?;
        tx.set_nonblocking(true)?;
        Ok((rx, tx))
    }) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("cannot create the poller's wake-up socket: {e}; retrying on the next tick");
            return;
        }
    };
    // SAFETY: main thread; registers rx's fd (ownership passes to nginx) with the event loop.
    let wake = match unsafe { register_wake(rx) } {
        Some(c) => c,
        None => {
            tracing::error!(
                "cannot register the poller's wake-up socket with nginx (worker_connections exhausted?); retrying on the next tick"
            );
            return;
        }
    };
    let mailbox = Mailbox::new(tx);
    log::set_waker(Some(mailbox.clone()));
    let connections = main.consul_connections.unwrap_or(crate::plan::DEFAULT_CONNECTIONS);
    match Poller::start(specs, connections, mailbox, Box::new(|f| spawn_without_signals(f, "upsync-poller"))) {
        Ok(poller) => {
            tracing::info!("worker {} holds the Consul watches of {} upstream(s)", std::process::id(), main.upstreams.len());
            // A list from Consul that no leader dumped yet (the first list of a
            // strong_dependency=on upstream is read by the master): dump it once.
            for (&srv, slot) in main.upstreams.iter().zip(&slots) {
                if slot.meta.origin == Origin::Consul {
                    // SAFETY: srv is a synced upstream conf of this cycle.
                    let srv = unsafe { &*srv };
                    request_dump(poller.mailbox(), srv, &shm::upstream_name(srv), &slot.servers);
                }
            }
            w.leader = Some(Leadership { poller, wake, slots });
        }
        Err(e) => {
            log::set_waker(None);
            // SAFETY: wake was registered above and is not used elsewhere.
            unsafe { ngx_close_connection(wake) };
            tracing::error!("cannot start the Consul poller thread: {e}; retrying on the next tick");
        }
    }
}

/// Stops the poller (without waiting for its thread) and closes the wake-up socket; with
/// `release`, also gives the lease back so another worker takes it on its next tick.
///
/// # Safety
/// Main thread; `w.main` of the running cycle.
unsafe fn stop_leading(w: &mut Worker, release: bool) {
    if let Some(l) = w.leader.take() {
        log::set_waker(None);
        l.poller.stop();
        // SAFETY: the connection was registered by start_leading and is closed only here.
        unsafe { ngx_close_connection(l.wake) };
    }
    if release {
        let pid = std::process::id() as i64;
        // SAFETY: contract: main thread, header of the running cycle.
        let released = unsafe {
            shm::update_lease(&*w.main, |lease| {
                if lease.leader_pid == pid {
                    (true, Some(Lease { leader_pid: 0, leader_generation: 0, heartbeat_ms: 0 }))
                } else {
                    (false, None)
                }
            })
        };
        if released {
            tracing::info!("worker {pid} released the Consul watches");
        }
    }
}

/// Starts a thread that never receives process signals.
pub(super) fn spawn_without_signals(f: Box<dyn FnOnce() + Send>, name: &str) -> std::io::Result<std::thread::JoinHandle<()>> {
    // nginx relies on process signals reaching the worker's main thread: our threads (and any
    // thread they start) inherit a mask that blocks them all.
    // SAFETY: sigset_t is plain data; pthread_sigmask only changes this thread's mask, restored
    // right after the spawn.
    unsafe {
        let mut all: libc::sigset_t = core::mem::zeroed();
        let mut old: libc::sigset_t = core::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let r = std::thread::Builder::new().name(name.into()).spawn(f);
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, ptr::null_mut());
        r
    }
}

/// Puts the read end of the wake-up socket into nginx's event loop.
///
/// # Safety
/// Main thread of a worker.
unsafe fn register_wake(rx: UnixStream) -> Option<*mut ngx_connection_t> {
    let fd = rx.into_raw_fd();
    // SAFETY: main thread: ngx_cycle is the running cycle.
    let log = unsafe { (*ngx_cycle).log };
    // SAFETY: nginx takes ownership of fd through the connection.
    let c = unsafe { ngx_get_connection(fd, log) };
    if c.is_null() {
        // SAFETY: fd is ours still (nginx did not take it).
        unsafe { libc::close(fd) };
        return None;
    }
    // SAFETY: a connection nginx just handed out, with its read and write events.
    let (conn, rev, wev) = unsafe { (&mut *c, &mut *(*c).read, &mut *(*c).write) };
    rev.handler = Some(on_wake);
    rev.log = log;
    wev.log = log;
    // `idle`: when nginx starts a graceful shutdown it calls the read handler of idle
    // connections with `close` set, which is our cue to stop polling at once.
    conn.set_idle(1);
    // nginx's portable registration (edge-triggered on epoll: on_wake reads until EAGAIN).
    // SAFETY: the read event of a live connection, on the main thread.
    if unsafe { ngx_handle_read_event(rev, 0) } != NGX_OK as ngx_int_t {
        // SAFETY: our connection, not registered; closing it closes fd.
        unsafe { ngx_close_connection(c) };
        return None;
    }
    Some(c)
}

/// The poller (or a log line from it) woke us up; or nginx is shutting down.
unsafe extern "C" fn on_wake(ev: *mut ngx_event_t) {
    guard("the poller's wake-up", (), || {
        // SAFETY: ev is the read event of our wake connection.
        let (c, closing) = unsafe {
            let c = (*ev).data as *mut ngx_connection_t;
            (c, (*c).close() != 0)
        };
        if closing {
            WORKER.with(|cell| {
                if let Some(w) = cell.borrow_mut().as_mut() {
                    // SAFETY: main thread.
                    unsafe { stop_leading(w, true) };
                }
            });
            log::drain();
            return;
        }
        // Drain the socket until EAGAIN (nginx registers it edge-triggered on epoll).
        let mut buf = [0u8; 256];
        // SAFETY: c is our connection; fd is a non-blocking socket we own through it.
        while unsafe { libc::read((*c).fd, buf.as_mut_ptr() as *mut c_void, buf.len()) } > 0 {}
        log::drain();
        WORKER.with(|cell| {
            if let Some(w) = cell.borrow_mut().as_mut() {
                // SAFETY: main thread.
                unsafe { apply_updates(w) };
            }
        });
    })
}

/// Writes the poller's results into the shared slots and installs them in this worker. The
/// work per update is a comparison with the installed list and a copy of the prepared bytes
/// into the zone (the poller thread decoded, summarised and encoded the list).
///
/// # Safety
/// Main thread; `w.main` of the running cycle.
unsafe fn apply_updates(w: &mut Worker) {
    // SAFETY: contract.
    let main = unsafe { &mut *w.main };
    let Some(l) = w.leader.as_mut() else { return };
    let pid = std::process::id() as i64;
    // SAFETY: main thread, header of the running cycle.
    if unsafe { shm::leader_pid(main) } != pid {
        // Lost the lease (we were stuck); the next tick stops the poller.
        return;
    }
    let pool = shm::pool_of(main);
    for u in l.poller.mailbox().take() {
        let id = match &u {
            Update::Servers { id, .. } | Update::Synced { id, .. } | Update::Error { id, .. } | Update::Restarted { id, .. } => *id,
        };
        let (Some(&srv), Some(state)) = (main.upstreams.get(id), l.slots.get_mut(id)) else { continue };
        // SAFETY: srv is a synced upstream conf of this cycle.
        let srv = unsafe { &mut *srv };
        let Some(slot) = srv.slot else { continue };
        let name = shm::upstream_name(srv);
        let now = unix_ms();
        let meta = &mut state.meta;
        meta.leader_pid = pid;
        match u {
            Update::Servers { servers, encoded, summary, index, .. } if *state.servers != servers => {
                let mut next = meta.clone();
                next.origin = Origin::Consul;
                next.consul_index = index;
                next.changed_ms = now;
                next.synced_ms = now;
                next.last_error = None;
                next.watch = WatchHealth::Healthy;
                // SAFETY: main thread; zone pointers of this cycle.
                match unsafe { shm::install(pool, slot.as_ptr(), &encoded, &next) } {
                    Ok(()) => {
                        tracing::info!("upstream \"{name}\": {} server(s) from Consul at index {index} ({summary})", servers.len());
                        *meta = next;
                        state.servers = Arc::new(servers);
                        request_dump(l.poller.mailbox(), srv, &name, &state.servers);
                        // SAFETY: main thread.
                        unsafe { peers::sync(srv) };
                    }
                    Err(e) => {
                        tracing::error!("upstream \"{name}\": {e} (Consul index {index}, {} servers)", servers.len());
                        meta.last_error = Some(e);
                        meta.error_ms = now;
                        meta.consul_index = index;
                        meta.watch = WatchHealth::Healthy;
                        // SAFETY: main thread; zone pointers of this cycle.
                        unsafe { shm::write_meta(pool, slot.as_ptr(), meta) };
                    }
                }
            }
            Update::Servers { index, .. } | Update::Synced { index, .. } => {
                // An answer equal to the list installed (also after a failed install was
                // followed by the previous list again). A list from the dump file or the
                // config that Consul confirms is now Consul's, and the dump file says so.
                if meta.origin != Origin::Consul {
                    meta.origin = Origin::Consul;
                    request_dump(l.poller.mailbox(), srv, &name, &state.servers);
                }
                meta.consul_index = index;
                meta.synced_ms = now;
                meta.last_error = None;
                meta.watch = WatchHealth::Healthy;
                // SAFETY: main thread; zone pointers of this cycle.
                unsafe { shm::write_meta(pool, slot.as_ptr(), meta) };
            }
            Update::Error { message, index, watch_ok, .. } => {
                meta.last_error = Some(message);
                meta.error_ms = now;
                meta.watch = if watch_ok { WatchHealth::Healthy } else { WatchHealth::Failing };
                if index != 0 {
                    meta.consul_index = index;
                }
                // SAFETY: main thread; zone pointers of this cycle.
                unsafe { shm::write_meta(pool, slot.as_ptr(), meta) };
            }
            Update::Restarted { message, .. } => {
                meta.last_error = Some(message);
                meta.error_ms = now;
                meta.watch = WatchHealth::Failing;
                meta.watch_restarts = meta.watch_restarts.saturating_add(1);
                // SAFETY: main thread; zone pointers of this cycle.
                unsafe { shm::write_meta(pool, slot.as_ptr(), meta) };
            }
        }
    }
}

/// Asks the poller thread to write the upstream's dump file (when it has one) with `servers`.
fn request_dump(mailbox: &Mailbox, srv: &SrvConf, name: &str, servers: &Arc<Vec<Server>>) {
    if let Some(path) = &srv.sync.dump_path {
        mailbox.request_dump(DumpRequest { upstream: name.to_string(), path: path.clone(), servers: servers.clone() });
    }
}
