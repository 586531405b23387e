//! The Consul poller: one thread in the leader worker, holding one blocking query per synced
//! upstream through `upsync-discovery`, and handing results to the worker's event loop.
//!
//! The thread never touches nginx: it owns its data (`WatchSpec`s built from the config), puts
//! [`Update`]s in a queue and pokes a socket the event loop watches. It also writes the dump
//! files (plain file I/O, kept off the event loop).
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::conf::UpstreamSync;
use crate::model::Server;

/// What the poller watches for one upstream.
#[derive(Clone, Debug)]
pub struct WatchSpec {
    /// Index of the upstream in the worker's list (echoed in [`Update`]s).
    pub id: usize,
    pub upstream: String,
    pub sync: UpstreamSync,
    /// The list the workers serve now (from the shared slot): an answer equal to it changes nothing.
    pub known: Option<Vec<Server>>,
}

/// A result for the event loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Update {
    /// A new list (different from the last one) at Consul index `index`.
    Servers { id: usize, servers: Vec<Server>, index: u64 },
    /// Consul answered; the list did not change.
    Synced { id: usize, index: u64 },
    /// Something went wrong; the list being served stays.
    Error { id: usize, message: String, index: u64 },
}

/// Shared between the poller thread and the event loop.
pub struct Mailbox {
    updates: Mutex<Vec<Update>>,
    stop: AtomicBool,
    waker: UnixStream,
}

impl Mailbox {
    pub fn new(waker: UnixStream) -> Arc<Mailbox> {
        Arc::new(Mailbox { updates: Mutex::new(Vec::new()), stop: AtomicBool::new(false), waker })
    }

    pub fn push(&self, u: Update) {
        self.updates.lock().unwrap_or_else(|e| e.into_inner()).push(u);
        self.wake();
    }

    /// Pokes the event loop. The socket is non-blocking: when it is full a wake-up is already
    /// pending, so a failed write loses nothing.
    pub fn wake(&self) {
        let _ = (&self.waker).write(&[1]);
    }

    pub fn take(&self) -> Vec<Update> {
        std::mem::take(&mut *self.updates.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}

/// The running poller thread.
pub struct Poller {
    mailbox: Arc<Mailbox>,
    thread: Option<JoinHandle<()>>,
}

/// How the FFI layer starts a thread (it blocks all signals around the spawn).
pub type Spawner = dyn FnOnce(Box<dyn FnOnce() + Send>) -> std::io::Result<JoinHandle<()>>;

impl Poller {
    pub fn start(specs: Vec<WatchSpec>, mailbox: Arc<Mailbox>, spawn: Box<Spawner>) -> std::io::Result<Poller> {
        let mb = mailbox.clone();
        let thread = spawn(Box::new(move || run(specs, mb)))?;
        Ok(Poller { mailbox, thread: Some(thread) })
    }

    pub fn mailbox(&self) -> &Arc<Mailbox> {
        &self.mailbox
    }

    /// Whether the thread ended (it only ends on stop, or if it panicked).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops the watches and joins the thread.
    pub fn stop(mut self) {
        self.mailbox.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(specs: Vec<WatchSpec>, mailbox: Arc<Mailbox>) {
    let _ = specs;
    while !mailbox.stopping() {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A blocking read of one upstream's servers at start-up (`strong_dependency=on`): `attempts`
/// tries, each bounded by the upsync timeout. Runs on the calling thread with a short-lived
/// runtime; nothing outlives the call.
pub fn fetch_initial(upstream: &str, sync: &UpstreamSync, attempts: u32) -> Result<(Vec<Server>, u64), String> {
    let _ = (upstream, sync, attempts);
    Err("not implemented".into())
}
