//! Shared by the `discovery_*` integration tests: a watch running the way the nginx module
//! runs it (its own thread, a current-thread tokio runtime), events handed to the test thread.
#![allow(dead_code)]
use std::sync::mpsc;
use std::time::{Duration, Instant};

use upsync_discovery::{Client, ConsulConfig, EndpointSet, Query, Watch, WatchEvent, WatchOptions};

/// Generous: the machine is shared; nothing here measures speed.
pub const LONG: Duration = Duration::from_secs(60);

/// A current-thread runtime with I/O and timers, as the module and `fetch_once` use.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime")
}

pub fn client(addresses: &str) -> Client {
    Client::new(ConsulConfig::from_addresses(addresses).expect("addresses")).expect("client")
}

/// Options for tests: a short `wait` so a test never sits in a 5-minute blocking query.
pub fn opts() -> WatchOptions {
    WatchOptions { wait: Duration::from_secs(10), ..WatchOptions::default() }
}

/// A watch on its own thread. Dropping it stops the watch (its future is dropped mid-request)
/// and joins the thread.
pub struct WatchThread {
    rx: mpsc::Receiver<(Instant, WatchEvent)>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl WatchThread {
    pub fn start(client: Client, query: Query, opts: WatchOptions) -> WatchThread {
        let (tx, rx) = mpsc::channel();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let handle = std::thread::spawn(move || {
            runtime().block_on(async move {
                let mut watch = Watch::new(client, query, opts);
                loop {
                    tokio::select! {
                        ev = watch.next() => if tx.send((Instant::now(), ev)).is_err() { break },
                        _ = &mut stopped => break,
                    }
                }
            })
        });
        WatchThread { rx, stop: Some(stop), handle: Some(handle) }
    }

    /// The next event, with the instant it was produced.
    pub fn next_timed(&self, timeout: Duration) -> (Instant, WatchEvent) {
        self.rx.recv_timeout(timeout).unwrap_or_else(|e| panic!("no watch event within {timeout:?}: {e}"))
    }

    pub fn next(&self, timeout: Duration) -> WatchEvent {
        self.next_timed(timeout).1
    }

    /// The next `Changed` set; an `Error` event fails the test.
    pub fn next_set(&self, timeout: Duration) -> (EndpointSet, u64) {
        match self.next(timeout) {
            WatchEvent::Changed { value, index, .. } => (value.into_endpoints().expect("an endpoint set"), index),
            WatchEvent::Error { error, .. } => panic!("unexpected watch error: {error}"),
        }
    }

    /// Skips events (errors included) until a set satisfies `pred`; returns it and the number
    /// of `Changed` events seen on the way (it included).
    pub fn until_set(&self, timeout: Duration, what: &str, pred: impl Fn(&EndpointSet) -> bool) -> (EndpointSet, usize) {
        let deadline = Instant::now() + timeout;
        let mut changes = 0;
        loop {
            let left = deadline.checked_duration_since(Instant::now()).unwrap_or_else(|| panic!("timed out waiting for {what}"));
            match self.rx.recv_timeout(left) {
                Ok((_, WatchEvent::Changed { value, .. })) => {
                    changes += 1;
                    let set = value.into_endpoints().expect("an endpoint set");
                    if pred(&set) {
                        return (set, changes);
                    }
                }
                Ok((_, WatchEvent::Error { .. })) => {}
                Err(_) => panic!("timed out after {timeout:?} waiting for {what}"),
            }
        }
    }

    /// The next `Error` event (skipping changes).
    pub fn next_error(&self, timeout: Duration) -> upsync_discovery::Error {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now()).expect("timed out waiting for a watch error");
            if let WatchEvent::Error { error, .. } = self.next(left) {
                return error;
            }
        }
    }

    /// Every event produced during `window` from now.
    pub fn collect_for(&self, window: Duration) -> Vec<WatchEvent> {
        let end = Instant::now() + window;
        let mut out = Vec::new();
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.rx.recv_timeout(left) {
                Ok((_, ev)) => out.push(ev),
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(e) => panic!("watch thread ended: {e}"),
            }
        }
        out
    }
}

impl Drop for WatchThread {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// `host:port` of every endpoint.
pub fn addrs(set: &EndpointSet) -> Vec<String> {
    set.iter().map(|e| e.addr()).collect()
}
