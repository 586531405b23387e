//! Per-worker lifecycle: a tick timer that renews or contends for the leader lease and keeps the
//! worker's peers in step with the shared slots; in the leader, the Consul poller process it
//! forks and the socket through which the poller reports to the event loop.
//!
//! How one poll per nginx instance works: see `module/README.md`. In short: the lease (PID,
//! generation, heartbeat) is in the shared zone; on every tick a worker renews it (leader),
//! takes it with a compare-and-swap when it is vacant (no leader, leader PID gone, heartbeat
//! stale, or leader from an older configuration), or follows. The leader's poller process holds
//! one blocking query per upstream; results come back over a socket to the leader's event loop,
//! which writes the slots. No worker has a thread of the module's for the poller (see
//! `crate::poller` for why). Every worker (leader included) installs a slot's list when its version moves, at
//! the latest on its next request to that upstream.
use core::ffi::c_void;
use core::ptr;
use std::cell::RefCell;
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::os::unix::net::UnixStream;

use ngx::ffi::*;

use super::{cycle_main_conf, guard, log, main_conf_of, peers, shm, MainConf, SrvConf};
use crate::lease::{self, Decision, Lease, Me};
use crate::link::{self, Command, Inbox, Report};
use crate::model::{decode_servers, unix_ms, Origin, SlotMeta, WatchHealth};
use crate::poller::{self, Mailbox, WatchSpec};

/// How often a worker looks at the lease and the slots.
const TICK_MS: ngx_msec_t = 200;
/// After the poller process ended unexpectedly, the pause before the next one starts.
const RESTART_AFTER_MS: u64 = 1000;
/// A poller that ends before any watch result (a list, a sync or an error), this many times in
/// a row, is run as a thread of the worker from then on (see `Worker::thread_poller`).
const QUICK_EXITS_MAX: u32 = 2;

struct Worker {
    main: *mut MainConf,
    /// Owns the timer event nginx holds a pointer to.
    _tick: Box<ngx_event_t>,
    /// The tick's `data`: nginx's debug logging of timers reads `ev->data` as a connection and
    /// prints its fd, so a timer without a connection needs a stand-in with `fd = -1`.
    _dummy: Box<ngx_connection_t>,
    leader: Option<Leadership>,
    /// When the last poller process ended unexpectedly (ngx_current_msec), for the restart pause.
    lost_at: Option<u64>,
    /// Pollers in a row that ended before any watch result.
    quick_exits: u32,
    /// Run the poller as a thread of this worker instead of a process: the fallback when forked
    /// pollers keep ending at once (the link protocol is the same; the worker then pays glibc's
    /// multi-threaded path, ~1% per request).
    thread_poller: bool,
}

/// What the leader knows of one upstream's slot (index = position in MainConf::upstreams).
struct LeaderSlot {
    /// The list installed in the slot (what every worker serves), as the zone stores it.
    encoded: Vec<u8>,
    meta: SlotMeta,
}

/// What the leader runs.
struct Leadership {
    /// The poller process (a child of this worker); 0 for a poller thread.
    pid: libc::pid_t,
    /// Our end of the socket to the poller, registered in nginx's event loop.
    link: *mut ngx_connection_t,
    /// What the poller sent that does not make a whole frame yet.
    inbox: Inbox,
    /// The buffer `read` fills, kept (a fresh one per wake-up was most of its cost).
    buf: Vec<u8>,
    /// Answers to the poller not written yet (its socket was full).
    outbox: Vec<u8>,
    /// The poller's socket closed or broke: the next tick starts a new poller.
    lost: bool,
    /// The poller reported on a watch (a list, a sync, an error): it runs. Its log lines do not
    /// count: a poller that logs its start and dies before any watch result ends "quickly".
    heard: bool,
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
    WORKER.with(|w| {
        *w.borrow_mut() =
            Some(Worker { main, _tick: tick, _dummy: dummy, leader: None, lost_at: None, quick_exits: 0, thread_poller: false })
    });
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
            if w.leader.as_ref().is_some_and(|l| l.lost) {
                let quick = w.leader.as_ref().is_some_and(|l| !l.heard);
                // SAFETY: main thread.
                unsafe { stop_leading(w, false) };
                w.lost_at = Some(now);
                w.quick_exits = if quick { w.quick_exits + 1 } else { 0 };
                if w.quick_exits >= QUICK_EXITS_MAX && !w.thread_poller {
                    w.thread_poller = true;
                    tracing::error!(
                        "{} Consul poller processes in a row ended before any result from Consul; this worker runs the poller as a thread from now on (each request then costs ~1% more: glibc's multi-threaded path)",
                        w.quick_exits
                    );
                }
            }
            let pausing = w.lost_at.is_some_and(|at| now.saturating_sub(at) < RESTART_AFTER_MS);
            if w.leader.is_none() && !pausing {
                // SAFETY: main thread.
                unsafe { start_leading(w) };
            }
            if let Some(l) = w.leader.as_mut() {
                // SAFETY: the link connection is ours, on the main thread.
                unsafe { flush(l) };
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

/// Forks the poller process and registers our end of its socket with the event loop.
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
        let (meta, encoded) = match srv.slot {
            Some(s) => {
                // SAFETY: main thread, zone pointers of this cycle.
                let (_, meta) = unsafe { shm::read_meta(pool, s.as_ptr()) };
                // SAFETY: as above.
                let encoded = unsafe { shm::read_servers(pool, s.as_ptr()) }.map(|(_, b)| b).unwrap_or_default();
                (meta, encoded)
            }
            None => (SlotMeta::default(), Vec::new()),
        };
        // The poller's watch starts from the list served when it came from Consul (an answer
        // equal to it changes nothing); a list from the dump file or the config is replaced by
        // Consul's first answer.
        let known = if meta.origin == Origin::Consul { decode_servers(&encoded).ok() } else { None };
        specs.push(WatchSpec { id, upstream: shm::upstream_name(srv), sync: srv.sync.clone(), known });
        slots.push(LeaderSlot { encoded, meta });
    }
    let (ours, theirs) = match UnixStream::pair().and_then(|(ours, theirs)| ours.set_nonblocking(true).map(|()| (ours, theirs))) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("cannot create the socket to the Consul poller process: {e}; retrying on the next tick");
            return;
        }
    };
    let connections = main.consul_connections.unwrap_or(crate::plan::DEFAULT_CONNECTIONS);
    let pid = if w.thread_poller {
        let run = move || poller::run_process(specs, connections, Mailbox::new(), theirs, Vec::new);
        match spawn_without_signals(Box::new(run), "upsync-poller") {
            Ok(_) => 0,
            Err(e) => {
                tracing::error!("cannot start the Consul poller thread: {e}; retrying on the next tick");
                return;
            }
        }
    } else {
        // SAFETY: main thread of a worker; `theirs` is a fresh socket handed to the child.
        match unsafe { fork_poller(theirs, specs, connections) } {
            Ok(pid) => pid,
            Err(e) => {
                tracing::error!("cannot start the Consul poller process (fork: {e}); retrying on the next tick");
                return;
            }
        }
    };
    // SAFETY: main thread; registers ours's fd (ownership passes to nginx) with the event loop.
    let Some(link) = (unsafe { register_wake(ours) }) else {
        // The poller sees its socket close and exits.
        tracing::error!(
            "cannot register the socket to the Consul poller process with nginx (worker_connections exhausted?); retrying on the next tick"
        );
        return;
    };
    let l =
        Leadership { pid, link, inbox: Inbox::default(), buf: vec![0; 64 * 1024], outbox: Vec::new(), lost: false, heard: false, slots };
    tracing::info!("worker {} holds the Consul watches of {} upstream(s) ({})", std::process::id(), main.upstreams.len(), l.name());
    w.lost_at = None;
    w.leader = Some(l);
}

impl Leadership {
    fn name(&self) -> String {
        if self.pid == 0 {
            "poller thread".into()
        } else {
            format!("poller process {}", self.pid)
        }
    }
}

/// Forks the poller process, which runs [`poller::run_process`] on `link` and never returns
/// into nginx. Returns its PID.
///
/// # Safety
/// Main thread of a worker.
unsafe fn fork_poller(link: UnixStream, specs: Vec<WatchSpec>, connections: usize) -> std::io::Result<libc::pid_t> {
    // SAFETY: plain system call.
    let worker = unsafe { libc::getpid() };
    // SAFETY: fork in a worker whose only thread of ours is this one (builder threads take no
    // lock the child uses: its log queue and waker are its own, see log::forward_all). The
    // child only runs poller_main, which never returns.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => poller_main(link, worker, specs, connections),
        pid => Ok(pid),
    }
}

/// The poller process, from the fork to its exit.
fn poller_main(link: UnixStream, worker: libc::pid_t, specs: Vec<WatchSpec>, connections: usize) -> ! {
    let run = std::panic::AssertUnwindSafe(move || {
        // SAFETY: in the child right after the fork, with one thread; `link` is its socket.
        unsafe { become_poller(link.as_raw_fd(), worker) };
        let mailbox = Mailbox::new();
        log::forward_all(mailbox.clone());
        poller::run_process(specs, connections, mailbox, link, log::take_queued);
        // What could not reach the worker (the socket broke): its warnings and errors go to
        // stderr, which nginx points at its error log.
        for (level, line) in log::take_queued() {
            if level <= NGX_LOG_WARN as usize {
                eprintln!("{line} (poller process {}, after its socket to worker {worker} closed)", std::process::id());
            }
        }
    });
    let code = if std::panic::catch_unwind(run).is_ok() { 0 } else { 1 };
    // SAFETY: ends the child without running anything of the worker's (atexit, destructors).
    unsafe { libc::_exit(code) }
}

/// Makes the fresh child a process of its own: it dies with its worker, leaves nginx's process
/// group, has the default signal handling, none of nginx's sockets open (client and upstream
/// connections, listening sockets, the channel to the master: a client connection the child
/// held would stay open after the worker closed it) but its own, and names itself in `ps`.
///
/// Only nginx's sockets are closed, not every inherited file: libraries keep files in statics
/// across a fork, e.g. tokio's process-wide signal pipe, which the master creates when it reads
/// a `strong_dependency=on` upstream's first list, and which the child's runtime reuses (closing
/// every file made its runtime fail with EBADF). The files left (nginx's logs, its epoll
/// instance) are never used by the child.
///
/// # Safety
/// In the child right after the fork, with one thread; `keep` is the child's end of the socket.
unsafe fn become_poller(keep: RawFd, worker: libc::pid_t) {
    // SAFETY: plain system calls on this process, with valid arguments; the title is a
    // NUL-terminated string nginx copies into its argv area (as for its own processes).
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if libc::getppid() != worker {
            eprintln!("upsync: poller process {}: its worker {worker} is already gone; exiting", libc::getpid());
            libc::_exit(0);
        }
        libc::setsid();
        let mut none: libc::sigset_t = core::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, ptr::null_mut());
        for sig in 1..libc::SIGRTMIN() {
            libc::signal(sig, libc::SIG_DFL);
        }
        // A write to a closed socket is an error to handle, not a signal.
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        close_nginx_sockets(keep);
        libc::prctl(libc::PR_SET_NAME, c"upsync-poller".as_ptr());
        let what = if cfg!(upsync_stream) { "upsync stream poller" } else { "upsync poller" };
        let title = format!("{what} of worker {worker}\0");
        ngx_setproctitle(title.as_ptr() as *mut core::ffi::c_char);
    }
}

/// Closes, in the poller child, every socket of the running cycle's connections (nginx sets a
/// connection's fd to -1 when it closes it) and of its listening sockets (with `reuseport`, the
/// other workers' too), except `keep`. A number that is not a socket any more is left alone.
///
/// # Safety
/// In the child right after the fork, with one thread.
unsafe fn close_nginx_sockets(keep: RawFd) {
    let close_socket = |fd: RawFd| {
        if fd < 0 || fd == keep {
            return;
        }
        // SAFETY: fstat into a local struct; close of a descriptor this process owns (the
        // child's copy of nginx's).
        unsafe {
            let mut st: libc::stat = core::mem::zeroed();
            if libc::fstat(fd, &mut st) == 0 && st.st_mode & libc::S_IFMT == libc::S_IFSOCK {
                libc::close(fd);
            }
        }
    };
    // SAFETY: the cycle the worker ran when it forked, copied into this process with its
    // connections array (connection_n entries) and its listening array.
    unsafe {
        let cycle = ngx_cycle;
        if cycle.is_null() {
            return;
        }
        let (conns, n) = ((*cycle).connections, (*cycle).connection_n);
        if !conns.is_null() {
            for i in 0..n {
                close_socket((*conns.add(i)).fd);
            }
        }
        let ls = &(*cycle).listening;
        if !ls.elts.is_null() {
            for i in 0..ls.nelts {
                close_socket((*(ls.elts as *const ngx_listening_t).add(i)).fd);
            }
        }
    }
}

/// Stops the poller by closing its socket (it sees the close and exits; it also dies with this
/// worker in any case) without waiting for it; with `release`, also gives the lease back so
/// another worker takes it on its next tick.
///
/// # Safety
/// Main thread; `w.main` of the running cycle.
unsafe fn stop_leading(w: &mut Worker, release: bool) {
    if let Some(l) = w.leader.take() {
        // SAFETY: the connection was registered by start_leading and is closed only here.
        unsafe { ngx_close_connection(l.link) };
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

/// Puts our end of the poller's socket into nginx's event loop.
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

/// The poller sent something, or its socket closed; or nginx is shutting down.
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
        WORKER.with(|cell| {
            if let Some(w) = cell.borrow_mut().as_mut() {
                // SAFETY: main thread; c is the leader's link connection.
                unsafe { receive(w, c) };
            }
        });
        // A poller thread's lines (the fallback) wait in the queue.
        log::drain();
    })
}

/// Reads what the poller sent (until EAGAIN: nginx registers the socket edge-triggered on
/// epoll), applies it, and writes the answers.
///
/// # Safety
/// Main thread; `w.main` of the running cycle; `c` our link connection.
unsafe fn receive(w: &mut Worker, c: *mut ngx_connection_t) {
    let Some(l) = w.leader.as_mut().filter(|l| l.link == c) else { return };
    let closed = loop {
        // SAFETY: c is our connection; its fd a non-blocking socket we own through it; the
        // buffer is initialised and `len` long.
        let n = unsafe { libc::read((*c).fd, l.buf.as_mut_ptr() as *mut c_void, l.buf.len()) };
        if n > 0 {
            l.inbox.extend(&l.buf[..n as usize]);
            continue;
        }
        if n == 0 {
            break true;
        }
        match std::io::Error::last_os_error().kind() {
            std::io::ErrorKind::WouldBlock => break false,
            std::io::ErrorKind::Interrupted => continue,
            _ => break true,
        }
    };
    let mut reports = Vec::new();
    loop {
        match l.inbox.next_frame::<Report>() {
            Ok(Some(r)) => {
                l.heard |= !matches!(r, Report::Log { .. });
                reports.push(r);
            }
            Ok(None) => break,
            Err(e) => {
                tracing::error!("the socket from the Consul {} is unreadable ({e}); starting a new poller", l.name());
                l.lost = true;
                break;
            }
        }
    }
    if closed && !l.lost {
        tracing::error!(
            "the Consul {} ended unexpectedly (a process's exit status is in nginx's notice log as \"unknown process\"); starting a new one",
            l.name()
        );
        l.lost = true;
    }
    // SAFETY: contract.
    unsafe { apply_reports(w, reports) };
    if let Some(l) = w.leader.as_mut() {
        // SAFETY: contract.
        unsafe { flush(l) };
    }
}

/// Writes the answers waiting for the poller, as far as its socket takes them (the rest waits
/// for the next call: the answers are a few bytes each and the poller reads them at once).
///
/// # Safety
/// Main thread; `l.link` our live connection.
unsafe fn flush(l: &mut Leadership) {
    while !l.outbox.is_empty() && !l.lost {
        // SAFETY: the connection's fd is our non-blocking socket; the buffer is initialised.
        let n = unsafe { libc::write((*l.link).fd, l.outbox.as_ptr() as *const c_void, l.outbox.len()) };
        if n > 0 {
            l.outbox.drain(..n as usize);
            continue;
        }
        match std::io::Error::last_os_error().kind() {
            std::io::ErrorKind::WouldBlock => break,
            std::io::ErrorKind::Interrupted => {}
            // The poller is gone; the read side says so.
            _ => break,
        }
    }
}

/// Writes the poller's results into the shared slots and installs them in this worker. The
/// work per list is a comparison with the installed bytes and a copy into the zone (the poller
/// decoded, summarised and encoded the list).
///
/// # Safety
/// Main thread; `w.main` of the running cycle.
unsafe fn apply_reports(w: &mut Worker, reports: Vec<Report>) {
    // SAFETY: contract.
    let main = unsafe { &mut *w.main };
    let Some(l) = w.leader.as_mut() else { return };
    let pid = std::process::id() as i64;
    let pool = shm::pool_of(main);
    for r in reports {
        let id = match &r {
            Report::Log { level, line } => {
                log::write_line(*level, line);
                continue;
            }
            Report::Servers { id, .. } | Report::Synced { id, .. } | Report::Error { id, .. } | Report::Restarted { id, .. } => *id,
        };
        // SAFETY: main thread, header of the running cycle.
        if unsafe { shm::leader_pid(main) } != pid {
            // Lost the lease (we were stuck); the next tick stops the poller.
            continue;
        }
        let (Some(&srv), Some(state)) = (main.upstreams.get(id), l.slots.get_mut(id)) else { continue };
        // SAFETY: srv is a synced upstream conf of this cycle.
        let srv = unsafe { &mut *srv };
        let Some(slot) = srv.slot else { continue };
        let name = shm::upstream_name(srv);
        let now = unix_ms();
        let meta = &mut state.meta;
        meta.leader_pid = pid;
        match r {
            Report::Servers { seq, count, encoded, summary, index, .. } if state.encoded != encoded => {
                let mut next = meta.clone();
                next.origin = Origin::Consul;
                next.consul_index = index;
                next.changed_ms = now;
                next.synced_ms = now;
                next.last_error = None;
                next.watch = WatchHealth::Healthy;
                // SAFETY: main thread; zone pointers of this cycle.
                let installed = match unsafe { shm::install(pool, slot.as_ptr(), &encoded, &next) } {
                    Ok(()) => {
                        tracing::info!("upstream \"{name}\": {count} server(s) from Consul at index {index} ({summary})");
                        *meta = next;
                        state.encoded = encoded;
                        // SAFETY: main thread.
                        unsafe { peers::sync(srv) };
                        true
                    }
                    Err(e) => {
                        tracing::error!("upstream \"{name}\": {e} (Consul index {index}, {count} servers)");
                        meta.last_error = Some(e);
                        meta.error_ms = now;
                        meta.consul_index = index;
                        meta.watch = WatchHealth::Healthy;
                        // SAFETY: main thread; zone pointers of this cycle.
                        unsafe { shm::write_meta(pool, slot.as_ptr(), meta) };
                        false
                    }
                };
                link::frame(&Command::Ack { id, seq, dump: installed }, &mut l.outbox);
            }
            Report::Servers { seq, index, .. } => {
                // An answer equal to the list installed (also after a failed install was
                // followed by the previous list again). A list from the dump file or the
                // config that Consul confirms is now Consul's, and the dump file says so.
                let dump = meta.origin != Origin::Consul;
                confirm(meta, index, now);
                // SAFETY: main thread; zone pointers of this cycle.
                unsafe { shm::write_meta(pool, slot.as_ptr(), meta) };
                link::frame(&Command::Ack { id, seq, dump }, &mut l.outbox);
            }
            Report::Synced { index, .. } => {
                confirm(meta, index, now);
                // SAFETY: main thread; zone pointers of this cycle.
                unsafe { shm::write_meta(pool, slot.as_ptr(), meta) };
            }
            Report::Error { message, index, watch_ok, .. } => {
                meta.last_error = Some(message);
                meta.error_ms = now;
                meta.watch = if watch_ok { WatchHealth::Healthy } else { WatchHealth::Failing };
                if index != 0 {
                    meta.consul_index = index;
                }
                // SAFETY: main thread; zone pointers of this cycle.
                unsafe { shm::write_meta(pool, slot.as_ptr(), meta) };
            }
            Report::Restarted { message, .. } => {
                meta.last_error = Some(message);
                meta.error_ms = now;
                meta.watch = WatchHealth::Failing;
                meta.watch_restarts = meta.watch_restarts.saturating_add(1);
                // SAFETY: main thread; zone pointers of this cycle.
                unsafe { shm::write_meta(pool, slot.as_ptr(), meta) };
            }
            Report::Log { .. } => {}
        }
    }
}

/// Consul answered with the list served, at `index`.
fn confirm(meta: &mut SlotMeta, index: u64, now: u64) {
    meta.origin = Origin::Consul;
    meta.consul_index = index;
    meta.synced_ms = now;
    meta.last_error = None;
    meta.watch = WatchHealth::Healthy;
}
