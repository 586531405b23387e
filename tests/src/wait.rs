//! Polling helpers: tests wait for conditions, never for fixed durations.
use std::time::{Duration, Instant};

/// Polls `cond` every 10 ms until it returns true; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    wait_for(what, timeout, || cond().then_some(()))
}

/// Polls `f` every 10 ms until it returns `Some`; panics naming `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    match wait_for_value(timeout, f, Option::is_some) {
        Ok(Some(v)) => v,
        _ => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}

/// What [`wait_for_value`] saw when it gave up: the last value `probe` returned.
#[derive(Debug)]
pub struct TimedOut<V> {
    pub last: V,
}

/// Polls `probe` every 10 ms until `done` holds for its value and returns that value; after
/// `timeout`, the last value seen, for the caller's failure message.
pub fn wait_for_value<V>(timeout: Duration, mut probe: impl FnMut() -> V, mut done: impl FnMut(&V) -> bool) -> Result<V, TimedOut<V>> {
    let start = Instant::now();
    loop {
        let v = probe();
        if done(&v) {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            return Err(TimedOut { last: v });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
