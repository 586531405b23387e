//! `tracing` events into nginx's error log.
//!
//! On the process's main thread an event goes straight to `ngx_log_error` on the cycle's log.
//! Other threads (builders of large lists) must not call nginx, so their events wait in a
//! bounded queue that the main thread writes on its next tick. In the Consul poller process
//! ([`forward_all`]) every event waits in a queue of its own, which the poller sends to its
//! worker, and the worker writes them ([`write_line`]).
use std::collections::VecDeque;
use std::fmt::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::ThreadId;

use ngx::ffi::*;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

use crate::poller::Mailbox;

/// The thread that runs nginx's event loop (the master's main thread; after fork, the worker's
/// main thread is that same thread, with the same id).
static MAIN_THREAD: OnceLock<ThreadId> = OnceLock::new();
/// nginx's log level for the cycle's error log (NGX_LOG_*), readable from any thread.
static NGX_LEVEL: AtomicUsize = AtomicUsize::new(NGX_LOG_NOTICE as usize);
static QUEUE: Mutex<VecDeque<(usize, String)>> = Mutex::new(VecDeque::new());
/// Lines from other threads beyond this many are dropped (with a count) until the main thread catches up.
const QUEUE_MAX: usize = 1000;
static DROPPED: AtomicUsize = AtomicUsize::new(0);
/// Set in the poller process (and only there): every event goes to [`FORWARD_QUEUE`], a queue
/// the worker never touched, so no lock held by another thread of the worker at the fork can be
/// inherited, and wakes this mailbox.
static FORWARD_WAKER: OnceLock<Arc<Mailbox>> = OnceLock::new();
static FORWARD_QUEUE: Mutex<VecDeque<(usize, String)>> = Mutex::new(VecDeque::new());

fn forwarding() -> bool {
    FORWARD_WAKER.get().is_some()
}

/// Installs the subscriber (once per process; workers inherit it through fork).
pub fn init() {
    if MAIN_THREAD.set(std::thread::current().id()).is_ok() {
        let subscriber = tracing_subscriber::registry().with(NginxLayer);
        let _ = tracing::subscriber::set_global_default(subscriber);
    }
    // SAFETY: called on the main thread during configuration, where ngx_cycle is valid.
    unsafe {
        if !ngx_cycle.is_null() && !(*ngx_cycle).log.is_null() {
            set_level((*(*ngx_cycle).log).log_level);
        }
    }
}

pub fn set_level(level: usize) {
    NGX_LEVEL.store(level, Ordering::Relaxed);
}

fn ngx_level(level: &Level) -> usize {
    (match *level {
        Level::ERROR => NGX_LOG_ERR,
        Level::WARN => NGX_LOG_WARN,
        Level::INFO => NGX_LOG_NOTICE,
        Level::DEBUG | Level::TRACE => NGX_LOG_DEBUG,
    }) as usize
}

fn on_main_thread() -> bool {
    !forwarding() && MAIN_THREAD.get() == Some(&std::thread::current().id())
}

fn queue() -> &'static Mutex<VecDeque<(usize, String)>> {
    if forwarding() {
        &FORWARD_QUEUE
    } else {
        &QUEUE
    }
}

/// In the poller process, right after the fork: from now on no event calls nginx; they queue
/// for [`take_queued`] and wake `mailbox`.
pub fn forward_all(mailbox: Arc<Mailbox>) {
    DROPPED.store(0, Ordering::Relaxed);
    let _ = FORWARD_WAKER.set(mailbox);
}

/// The lines queued so far (with a line counting those dropped when the queue was full).
pub fn take_queued() -> Vec<(usize, String)> {
    let mut lines: Vec<(usize, String)> = queue().lock().unwrap_or_else(|e| e.into_inner()).drain(..).collect();
    let dropped = DROPPED.swap(0, Ordering::Relaxed);
    if dropped > 0 {
        lines.insert(0, (NGX_LOG_WARN as usize, format!("upsync: {dropped} log lines of the poller were dropped (queue full)")));
    }
    lines
}

/// Writes a line the poller process sent. Main thread of the worker only.
pub fn write_line(level: usize, line: &str) {
    if on_main_thread() && level <= NGX_LEVEL.load(Ordering::Relaxed) {
        write_now(level, line);
    }
}

fn write_now(level: usize, line: &str) {
    // SAFETY: main thread only (checked by callers); ngx_cycle and its log are valid there.
    unsafe {
        if ngx_cycle.is_null() || (*ngx_cycle).log.is_null() {
            return;
        }
        ngx::log::log_error(level as ngx_uint_t, (*ngx_cycle).log, 0, line.as_bytes());
    }
}

/// Writes the lines other threads queued. Main thread only.
pub fn drain() {
    if !on_main_thread() {
        return;
    }
    for (level, line) in take_queued() {
        write_now(level, &line);
    }
}

struct NginxLayer;

/// Our crates log at the level nginx's error_log asks for; other crates (hyper, rustls...) only
/// their warnings and errors.
fn wanted(meta: &Metadata<'_>) -> bool {
    let t = meta.target();
    let ours = t.starts_with("ngx_http_upsync_module") || t.starts_with("ngx_stream_upsync_module") || t.starts_with("upsync_discovery");
    if !ours && *meta.level() > Level::WARN {
        return false;
    }
    ngx_level(meta.level()) <= NGX_LEVEL.load(Ordering::Relaxed)
}

struct Line(String);

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }
}

impl<S: Subscriber> Layer<S> for NginxLayer {
    fn enabled(&self, meta: &Metadata<'_>, _ctx: Context<'_, S>) -> bool {
        wanted(meta)
    }

    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut line = Line(String::from("upsync: "));
        event.record(&mut line);
        let level = ngx_level(event.metadata().level());
        if on_main_thread() {
            write_now(level, &line.0);
            return;
        }
        {
            let mut q = queue().lock().unwrap_or_else(|e| e.into_inner());
            if q.len() >= QUEUE_MAX {
                DROPPED.fetch_add(1, Ordering::Relaxed);
                return;
            }
            q.push_back((level, line.0));
        }
        if let Some(m) = FORWARD_WAKER.get() {
            m.wake();
        }
    }
}
