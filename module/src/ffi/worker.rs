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
use core::sync::atomic::Ordering;
use std::cell::RefCell;
use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;

use ngx::ffi::*;

use super::{cycle_main_conf, log, peers, shm, MainConf, SrvConf};
use crate::lease::{self, Decision, Lease, Me};
use crate::model::{unix_ms, Origin, SlotState};
use crate::poller::{Mailbox, Poller, Update, WatchSpec};

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

/// What the leader runs.
struct Leadership {
    poller: Poller,
    /// The socket the poller writes to, registered in nginx's event loop.
    wake: *mut ngx_connection_t,
    /// The leader's copy of each slot's state (index = position in MainConf::upstreams).
    states: Vec<SlotState>,
}

thread_local! {
    // Only the worker's main thread (nginx's event loop) touches this.
    static WORKER: RefCell<Option<Worker>> = const { RefCell::new(None) };
}

pub unsafe extern "C" fn init_process(cycle: *mut ngx_cycle_t) -> ngx_int_t {
    // SAFETY: called by nginx on the new process's main thread with the running cycle.
    unsafe {
        if ngx_process != NGX_PROCESS_WORKER as ngx_uint_t && ngx_process != NGX_PROCESS_SINGLE as ngx_uint_t {
            return NGX_OK as ngx_int_t;
        }
        log::set_level((*(*cycle).log).log_level);
        let Some(main) = cycle_main_conf() else { return NGX_OK as ngx_int_t };
        if main.upstreams.is_empty() || main.header.is_null() {
            return NGX_OK as ngx_int_t;
        }
        let mut dummy: Box<ngx_connection_t> = Box::new(core::mem::zeroed());
        dummy.fd = -1;
        let mut tick: Box<ngx_event_t> = Box::new(core::mem::zeroed());
        tick.handler = Some(on_tick);
        tick.log = (*cycle).log;
        tick.data = &mut *dummy as *mut ngx_connection_t as *mut c_void;
        // A cancelable timer never keeps a shutting-down worker alive.
        tick.set_cancelable(1);
        let tick_ptr: *mut ngx_event_t = &mut *tick;
        WORKER.with(|w| *w.borrow_mut() = Some(Worker { main, _tick: tick, _dummy: dummy, leader: None }));
        // First tick right away: a new worker takes a vacant lease (e.g. after a reload) at once.
        nginx_sys::ngx_add_timer(tick_ptr, 1);
    }
    NGX_OK as ngx_int_t
}

pub unsafe extern "C" fn exit_process(_cycle: *mut ngx_cycle_t) {
    // Before nginx checks for open sockets: stop the poller and close our socket.
    let worker = WORKER.with(|w| w.borrow_mut().take());
    if let Some(mut w) = worker {
        // SAFETY: main thread; the worker's main conf belongs to the running cycle.
        unsafe { stop_leading(&mut w, true) };
    }
    log::drain();
}

fn exiting() -> bool {
    // SAFETY: plain reads of nginx's process-state globals on the main thread.
    unsafe { ngx_exiting != 0 || ngx_quit != 0 || ngx_terminate != 0 }
}

unsafe extern "C" fn on_tick(ev: *mut ngx_event_t) {
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
        if !exiting() {
            // SAFETY: the tick event lives in the Worker, which lives until exit_process.
            unsafe { nginx_sys::ngx_add_timer(ev, TICK_MS) };
        }
    });
}

/// One lease decision.
///
/// # Safety
/// Main thread, `w.main` of the running cycle.
unsafe fn tick(w: &mut Worker) {
    // SAFETY: contract.
    let main = unsafe { &mut *w.main };
    // SAFETY: header is in the shared zone mapped for the life of the process.
    let header = unsafe { &*main.header };
    let pid = std::process::id() as i64;
    // SAFETY: ngx_current_msec is updated by nginx's event loop on this thread.
    let now = unsafe { ngx_current_msec } as u64;
    let lease = Lease {
        leader_pid: header.leader_pid.load(Ordering::Acquire),
        leader_generation: header.leader_generation.load(Ordering::Acquire),
        heartbeat_ms: header.heartbeat_ms.load(Ordering::Acquire),
    };
    let me = Me {
        pid,
        generation: main.generation,
        current_generation: header.generation.load(Ordering::Acquire),
        exiting: exiting(),
        now_ms: now,
        leader_alive: lease.leader_pid == 0 || process_exists(lease.leader_pid),
    };
    match lease::decide(lease, me) {
        Decision::Renew => {
            header.heartbeat_ms.store(now, Ordering::Release);
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
            // SAFETY: main thread.
            unsafe { stop_leading(w, true) };
        }
        Decision::Acquire => {
            if header.leader_pid.compare_exchange(lease.leader_pid, pid, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                header.leader_generation.store(main.generation, Ordering::Release);
                header.heartbeat_ms.store(now, Ordering::Release);
                if lease.leader_pid != 0 {
                    tracing::info!(
                        "took over the Consul watches from worker {} (gone, stuck or from an older configuration)",
                        lease.leader_pid
                    );
                }
                // SAFETY: main thread.
                unsafe { start_leading(w) };
            }
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

fn process_exists(pid: i64) -> bool {
    // SAFETY: kill with signal 0 only checks for existence/permission.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Starts the poller thread and its wake-up socket.
///
/// # Safety
/// Main thread; `w.main` of the running cycle.
unsafe fn start_leading(w: &mut Worker) {
    // SAFETY: contract.
    let main = unsafe { &mut *w.main };
    let pool = shm::pool_of(main);
    let mut states = Vec::with_capacity(main.upstreams.len());
    let mut specs = Vec::with_capacity(main.upstreams.len());
    for (id, &srv) in main.upstreams.iter().enumerate() {
        // SAFETY: srv is a synced upstream conf of this cycle.
        let srv: &SrvConf = unsafe { &*srv };
        // SAFETY: main thread, zone pointers of this cycle.
        let state = match srv.slot.and_then(|s| unsafe { shm::read(pool, s.as_ptr()) }) {
            Some((_, Ok(s))) => s,
            _ => SlotState::default(),
        };
        specs.push(WatchSpec {
            id,
            upstream: shm::upstream_name(srv),
            sync: srv.sync.clone(),
            known: (state.origin == Origin::Consul).then(|| state.servers.clone()),
        });
        states.push(state);
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
    match Poller::start(specs, mailbox, Box::new(spawn_without_signals)) {
        Ok(poller) => {
            tracing::info!("worker {} holds the Consul watches of {} upstream(s)", std::process::id(), main.upstreams.len());
            w.leader = Some(Leadership { poller, wake, states });
        }
        Err(e) => {
            log::set_waker(None);
            // SAFETY: wake was registered above and is not used elsewhere.
            unsafe { ngx_close_connection(wake) };
            tracing::error!("cannot start the Consul poller thread: {e}; retrying on the next tick");
        }
    }
}

/// Stops the poller (joining its thread) and closes the wake-up socket; with `release`, also
/// gives the lease back so another worker takes it on its next tick.
///
/// # Safety
/// Main thread; `w.main` of the running cycle.
unsafe fn stop_leading(w: &mut Worker, release: bool) {
    if let Some(l) = w.leader.take() {
        log::set_waker(None);
        l.poller.stop();
        // SAFETY: the connection was registered by start_leading and is closed only here.
        unsafe { ngx_close_connection(l.wake) };
        // Results that arrived before the stop are still valid.
    }
    if release {
        // SAFETY: contract.
        let header = unsafe { &*(*w.main).header };
        let pid = std::process::id() as i64;
        if header.leader_pid.compare_exchange(pid, 0, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            tracing::info!("worker {pid} released the Consul watches");
        }
    }
}

fn spawn_without_signals(f: Box<dyn FnOnce() + Send>) -> std::io::Result<std::thread::JoinHandle<()>> {
    // nginx relies on process signals reaching the worker's main thread: the poller thread
    // (and any thread it starts) inherits a mask that blocks them all.
    // SAFETY: sigset_t is plain data; pthread_sigmask only changes this thread's mask, restored
    // right after the spawn.
    unsafe {
        let mut all: libc::sigset_t = core::mem::zeroed();
        let mut old: libc::sigset_t = core::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let r = std::thread::Builder::new().name("upsync-poller".into()).spawn(f);
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
    // SAFETY: nginx takes ownership of fd via the connection; on failure we close it ourselves.
    unsafe {
        let c = ngx_get_connection(fd, (*ngx_cycle).log);
        if c.is_null() {
            libc::close(fd);
            return None;
        }
        let rev = (*c).read;
        (*rev).handler = Some(on_wake);
        (*rev).log = (*ngx_cycle).log;
        (*(*c).write).log = (*ngx_cycle).log;
        // `idle`: when nginx starts a graceful shutdown it calls the read handler of idle
        // connections with `close` set, which is our cue to stop polling at once.
        (*c).set_idle(1);
        let add = ngx_event_actions.add?;
        if add(rev, (libc::EPOLLIN | libc::EPOLLRDHUP) as ngx_int_t, 0) != NGX_OK as ngx_int_t {
            ngx_close_connection(c);
            return None;
        }
        Some(c)
    }
}

/// The poller (or a log line from it) woke us up; or nginx is shutting down.
unsafe extern "C" fn on_wake(ev: *mut ngx_event_t) {
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
    // Drain the socket (level-triggered: it stays readable until empty).
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
}

/// Writes the poller's results into the shared slots and installs them in this worker.
///
/// # Safety
/// Main thread; `w.main` of the running cycle.
unsafe fn apply_updates(w: &mut Worker) {
    // SAFETY: contract.
    let main = unsafe { &mut *w.main };
    let Some(l) = w.leader.as_mut() else { return };
    // SAFETY: header in the shared zone.
    let header = unsafe { &*main.header };
    let pid = std::process::id() as i64;
    if header.leader_pid.load(Ordering::Acquire) != pid {
        // Lost the lease (we were stuck); the next tick stops the poller.
        return;
    }
    let pool = shm::pool_of(main);
    for u in l.poller.mailbox().take() {
        let (id, servers_changed) = match &u {
            Update::Servers { id, .. } | Update::Synced { id, .. } | Update::Error { id, .. } => (*id, matches!(u, Update::Servers { .. })),
        };
        let (Some(&srv), Some(state)) = (main.upstreams.get(id), l.states.get_mut(id)) else { continue };
        // SAFETY: srv is a synced upstream conf of this cycle.
        let srv = unsafe { &mut *srv };
        let name = shm::upstream_name(srv);
        let now = unix_ms();
        state.leader_pid = pid;
        match u {
            Update::Servers { servers, index, .. } => {
                let diff = describe_change(&state.servers, &servers);
                tracing::info!("upstream \"{name}\": {} server(s) from Consul at index {index} ({diff})", servers.len());
                state.servers = servers;
                state.origin = Origin::Consul;
                state.consul_index = index;
                state.changed_ms = now;
                state.synced_ms = now;
                state.last_error = None;
            }
            Update::Synced { index, .. } => {
                state.consul_index = index;
                state.synced_ms = now;
                state.last_error = None;
            }
            Update::Error { message, index, .. } => {
                state.last_error = Some(message);
                state.error_ms = now;
                if index != 0 {
                    state.consul_index = index;
                }
            }
        }
        let Some(slot) = srv.slot else { continue };
        // SAFETY: main thread; zone pointers of this cycle.
        if let Err(e) = unsafe { shm::write(pool, slot.as_ptr(), state, servers_changed) } {
            tracing::error!("upstream \"{name}\": {e}; the workers keep the previous list");
        }
        // SAFETY: main thread.
        unsafe { peers::sync(srv) };
    }
}

fn describe_change(old: &[crate::model::Server], new: &[crate::model::Server]) -> String {
    let added = new.iter().filter(|n| !old.iter().any(|o| o.addr == n.addr)).count();
    let removed = old.iter().filter(|o| !new.iter().any(|n| n.addr == o.addr)).count();
    let changed = new.iter().filter(|n| old.iter().any(|o| o.addr == n.addr && o != *n)).count();
    format!("+{added} -{removed} ~{changed}")
}
