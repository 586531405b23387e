//! Blocking-query watches, following Consul's rules (see README.md, "The watch algorithm").
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::client::{query_value, seg, Blocking, Client, Response, MAX_WAIT};
use crate::decode::{self, Decoded, HealthMode, KvCache, KvTree, Skipped};
use crate::endpoint::{Endpoint, EndpointSet};
use crate::error::Error;
use crate::etcd::{EtcdApi, EtcdWatch};

/// What to watch.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Query {
    /// `/v1/kv/PREFIX?recurse`, decoded with [`decode::decode_kv`].
    Kv { prefix: String },
    /// `/v1/catalog/service/NAME[?tag=TAG]`, decoded with [`decode::decode_catalog_service`].
    CatalogService { name: String, tag: Option<String> },
    /// `/v1/health/service/NAME[?tag=TAG]` (with `passing` in [`HealthMode::Omit`]), decoded
    /// with [`decode::decode_health_service`].
    HealthService { name: String, tag: Option<String>, mode: HealthMode },
    /// `/v1/catalog/services`, decoded with [`decode::decode_services`].
    Services,
    /// `/v1/kv/ROOT?recurse` kept whole ([`decode::decode_kv_tree`]): one blocking query serving
    /// every prefix under `ROOT` (`""`: the whole store).
    KvTree { root: String },
    /// `/v1/internal/ui/nodes`, Consul's node dump ([`decode::decode_node_dump`]): every
    /// instance of every service with its health, from one blocking query.
    NodeDump,
    /// Any blocking endpoint (`/v1/health/state/any`, ...): the body, not decoded. 404 is an
    /// empty body.
    Raw { path: String },
    /// The servers under an etcd key prefix, in the KV layout of `Kv` (see [`crate::etcd`]):
    /// v2, the path after `/v2/keys/`; v3, the key prefix as stored, without its trailing `/`.
    /// Not a Consul query: [`Watch`] and [`fetch_once`] hand it to [`crate::etcd`].
    Etcd { api: EtcdApi, prefix: String },
}

impl Query {
    /// The request path and query (without dc/consistency/index/wait, which the client adds).
    pub fn path(&self) -> String {
        match self {
            Query::Kv { prefix } => {
                let p = prefix.trim_matches('/');
                if p.is_empty() {
                    "/v1/kv/?recurse".to_string()
                } else {
                    // No trailing slash (as nginx-upsync-module): `DELETE PREFIX?recurse`
                    // leaves one tombstone at `PREFIX`, which a watch on `PREFIX/` does not
                    // see in Consul 1.8 (its index can then fall below the one held and the
                    // blocking query sleeps for the whole wait). The decoder ignores siblings
                    // such as `PREFIX2/...` that this wider prefix also returns.
                    format!("{}?recurse", crate::client::kv_path(p))
                }
            }
            Query::CatalogService { name, tag } => with_tag(format!("/v1/catalog/service/{}", seg(name)), tag.as_deref()),
            Query::HealthService { name, tag, mode } => {
                let p = with_tag(format!("/v1/health/service/{}", seg(name)), tag.as_deref());
                match mode {
                    HealthMode::MarkDown => p,
                    HealthMode::Omit if p.contains('?') => p + "&passing",
                    HealthMode::Omit => p + "?passing",
                }
            }
            Query::Services => "/v1/catalog/services".to_string(),
            Query::KvTree { root } => {
                let r = root.trim_matches('/');
                if r.is_empty() {
                    "/v1/kv/?recurse".to_string()
                } else {
                    // No trailing slash, as `Kv` (the tombstone of a deleted root is seen);
                    // siblings such as `ROOT2/...` are read too and served to no prefix.
                    format!("{}?recurse", crate::client::kv_path(r))
                }
            }
            Query::NodeDump => "/v1/internal/ui/nodes".to_string(),
            Query::Raw { path } => path.clone(),
            // As the `upsync` directive writes it (for messages; the requests are etcd's own).
            Query::Etcd { api: EtcdApi::V2, prefix } => format!("/v2/keys/{}", prefix.trim_matches('/')),
            Query::Etcd { api: EtcdApi::V3, prefix } => format!("/v3/kv/{prefix}"),
        }
    }

    /// The decoded answer; with `cache`, a `Kv` answer decodes only the entries that changed
    /// since the one the cache holds (see [`decode::decode_kv_cached`]; the result is the same).
    fn decode(&self, r: &Response, cache: Option<&mut KvCache>) -> Result<Decoded<WatchValue>, Error> {
        let body: &[u8] = if r.status == 404 { b"" } else { &r.body };
        let endpoints = |d: Result<Decoded<EndpointSet>, decode::DecodeError>| {
            d.map(|d| Decoded { value: WatchValue::Endpoints(d.value), skipped: d.skipped })
        };
        let result = match self {
            Query::Kv { prefix } => endpoints(match cache {
                Some(cache) => decode::decode_kv_cached(prefix, body, cache),
                None => decode::decode_kv(prefix, body),
            }),
            Query::CatalogService { .. } => endpoints(decode::decode_catalog_service(body)),
            Query::HealthService { mode, .. } => endpoints(decode::decode_health_service(body, *mode)),
            Query::Services => decode::decode_services(body).map(|s| Decoded { value: WatchValue::Services(s), skipped: Vec::new() }),
            Query::KvTree { .. } => {
                decode::decode_kv_tree(body).map(|t| Decoded { value: WatchValue::KvTree(Arc::new(t)), skipped: Vec::new() })
            }
            Query::NodeDump => {
                decode::decode_node_dump(body).map(|d| Decoded { value: WatchValue::Instances(Arc::new(d.value)), skipped: d.skipped })
            }
            Query::Raw { .. } => {
                let b = if r.status == 404 { Bytes::new() } else { r.body.clone() };
                Ok(Decoded { value: WatchValue::Raw(b), skipped: Vec::new() })
            }
            Query::Etcd { .. } => {
                Err(decode::DecodeError { what: "etcd query", message: "etcd answers are read by the etcd watch".into() })
            }
        };
        result.map_err(|error| Error::Decode { address: r.address.clone(), path: self.path(), error })
    }
}

fn with_tag(path: String, tag: Option<&str>) -> String {
    match tag {
        Some(t) if !t.is_empty() => format!("{path}?tag={}", query_value(t)),
        _ => path,
    }
}

/// A decoded result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchValue {
    Endpoints(EndpointSet),
    Services(BTreeMap<String, Vec<String>>),
    /// Shared: a whole tree is large and the watch keeps the last one to compare.
    KvTree(Arc<KvTree>),
    /// Every instance of every service (the node dump), in the dump's order.
    Instances(Arc<Vec<Endpoint>>),
    Raw(Bytes),
}

impl WatchValue {
    pub fn as_endpoints(&self) -> Option<&EndpointSet> {
        match self {
            WatchValue::Endpoints(e) => Some(e),
            _ => None,
        }
    }

    pub fn into_endpoints(self) -> Option<EndpointSet> {
        match self {
            WatchValue::Endpoints(e) => Some(e),
            _ => None,
        }
    }

    pub fn as_services(&self) -> Option<&BTreeMap<String, Vec<String>>> {
        match self {
            WatchValue::Services(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_raw(&self) -> Option<&Bytes> {
        match self {
            WatchValue::Raw(b) => Some(b),
            _ => None,
        }
    }
}

/// What [`Watch::next`] returns.
#[derive(Clone, Debug)]
pub enum WatchEvent {
    /// The decoded value differs from the previous one (always on the first success).
    Changed { value: WatchValue, index: u64, skipped: Vec<Skipped> },
    /// A request or decode failed. The watch keeps its last value and index and retries after
    /// `retry_in` (the next call to `next` waits that long first). `attempt` counts
    /// consecutive failures, from 1.
    Error { error: Error, index: u64, attempt: u32, retry_in: Duration },
}

/// What [`Watch::next_index`] returns (index mode).
#[derive(Clone, Debug)]
pub enum IndexEvent {
    /// `X-Consul-Index` moved, or the request did not block (the first, or the first after an
    /// error): the answer as Consul sent it (a 404 too). `reset`: the index went backwards (a
    /// restarted agent, a restored snapshot, a lagging server).
    Moved { response: Response, reset: bool },
    /// The index held, again (a wait that ran out, a spurious wake-up): Consul answers and
    /// nothing changed.
    Same { index: u64 },
    /// As [`WatchEvent::Error`].
    Error { error: Error, index: u64, attempt: u32, retry_in: Duration },
}

/// Token bucket limiting how often a watch may send a request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    /// Requests that may go back to back.
    pub burst: u32,
    /// Sustained requests per second (<= 0: unlimited).
    pub per_second: f64,
}

impl Default for RateLimit {
    /// Burst of 10, then 2 requests a second: a flapping key cannot make a watch spin.
    fn default() -> Self {
        RateLimit { burst: 10, per_second: 2.0 }
    }
}

/// Exponential backoff after errors: `initial * 2^(attempt-1)`, capped at `max`, each delay
/// drawn uniformly from its upper half (jitter, so many watchers do not retry in step).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { initial: Duration::from_millis(200), max: Duration::from_secs(30) }
    }
}

impl Backoff {
    /// The delay before retry number `attempt` (1-based), jittered with `rng`.
    pub fn delay(&self, attempt: u32, rng: &mut fastrand::Rng) -> Duration {
        let exp = attempt.saturating_sub(1).min(30);
        let full = self.initial.saturating_mul(1u32 << exp).min(self.max).max(Duration::from_millis(1));
        let half = full / 2;
        half + Duration::from_nanos(rng.u64(0..=half.as_nanos() as u64))
    }
}

/// Watch settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WatchOptions {
    /// Blocking-query `wait` (default 5 minutes; capped at Consul's maximum, 10 minutes).
    pub wait: Duration,
    pub rate: RateLimit,
    pub backoff: Backoff,
    /// Grow the `wait` with the watch's age: a watch `age` old blocks for
    /// `clamp(age, ramp_from, wait)`. Consul (1.8) counts a blocking query against its
    /// per-client connection limit until its `wait` runs out, even after the client has gone;
    /// a process that may be replaced soon after it starts (nginx reloads in a row) then
    /// leaves behind only queries that end soon. `None`: always `wait`.
    pub ramp_from: Option<Duration>,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions { wait: Duration::from_secs(300), rate: RateLimit::default(), backoff: Backoff::default(), ramp_from: None }
    }
}

/// A running watch on one query. Create it with [`Watch::new`] and call [`Watch::next`] (or,
/// in index mode, [`Watch::next_index`]) in a loop. Both are cancel-safe (they can be used in
/// `select!`); dropping their future or the watch stops everything at once (the request's
/// connection is closed). Needs no spawned task.
pub struct Watch {
    client: Client,
    query: Query,
    path: String,
    opts: WatchOptions,
    /// Index of the last value (0: none yet, or reset: the next request does not block).
    index: u64,
    last: Option<WatchValue>,
    /// Consecutive failures.
    attempt: u32,
    /// After an error, the next request does not block: a restarted agent or another server
    /// may have a lower index, which a blocking request would only reveal after `wait`.
    resync: bool,
    /// Do not send before this instant (backoff after an error).
    not_before: Option<Instant>,
    bucket: TokenBucket,
    rng: fastrand::Rng,
    /// When the watch was made (for `ramp_from`).
    born: Instant,
    /// The watch of a [`Query::Etcd`], which does all the work then.
    etcd: Option<Box<EtcdWatch>>,
    /// The entries of the last `Kv` answer, decoded (only changed entries are decoded again).
    kv_cache: KvCache,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").field("path", &self.path).field("index", &self.index).field("attempt", &self.attempt).finish()
    }
}

impl Watch {
    /// A watch of `query` through `client`. No I/O happens before the first `next`.
    pub fn new(client: Client, query: Query, opts: WatchOptions) -> Watch {
        let path = query.path();
        let etcd = match &query {
            Query::Etcd { api, prefix } => Some(Box::new(EtcdWatch::new(client.clone(), *api, prefix.clone(), opts))),
            _ => None,
        };
        Watch {
            client,
            query,
            path,
            opts,
            index: 0,
            last: None,
            attempt: 0,
            resync: false,
            not_before: None,
            bucket: TokenBucket::new(opts.rate),
            rng: fastrand::Rng::new(),
            born: Instant::now(),
            etcd,
            kv_cache: KvCache::default(),
        }
    }

    pub fn query(&self) -> &Query {
        &self.query
    }

    /// The Consul index of the last value (0 before the first).
    pub fn index(&self) -> u64 {
        match &self.etcd {
            Some(e) => e.index(),
            None => self.index,
        }
    }

    /// The last value yielded, if any.
    pub fn last(&self) -> Option<&WatchValue> {
        match &self.etcd {
            Some(e) => e.last(),
            None => self.last.as_ref(),
        }
    }

    /// Waits for the next change or error.
    pub async fn next(&mut self) -> WatchEvent {
        if let Some(e) = self.etcd.as_mut() {
            return e.next().await;
        }
        loop {
            let (_, result) = self.request().await;
            if let Some(event) = self.on_result(result) {
                return event;
            }
        }
    }

    /// Index mode: waits for the next answer or error, and reports every answer, undecoded
    /// (for a caller that decodes the body itself, or whose decoded value may stay the same
    /// when what it stands for changed: the list of service names when an instance comes or
    /// goes). Call either this or [`Watch::next`] on a watch, not both. The same rate limit,
    /// backoff and blocking rules as `next`, except that:
    ///
    /// - an answer is [`IndexEvent::Moved`] when its index differs from the one held or its
    ///   request did not block (the first, or the first after an error), else
    ///   [`IndexEvent::Same`];
    /// - an index that went backwards is reported (`reset`) and then blocked on, rather than
    ///   reset to 0 and read again: the answer carrying it is itself current;
    /// - every error makes the next request non-blocking, a garbage `X-Consul-Index` too
    ///   (`next` keeps blocking on the index it has after a decode error).
    ///
    /// An etcd watch has no Consul index: it yields only errors here (use `next`).
    pub async fn next_index(&mut self) -> IndexEvent {
        let (blocked, result) = self.request().await;
        self.on_answer(result, blocked)
    }

    /// Index mode's state machine: what a response or error means (`blocked`: whether its
    /// request blocked).
    fn on_answer(&mut self, result: Result<Response, Error>, blocked: bool) -> IndexEvent {
        let response = match result {
            Ok(r) => r,
            Err(error) => {
                let retry_in = self.failed(&error, true);
                return IndexEvent::Error { error, index: self.index, attempt: self.attempt, retry_in };
            }
        };
        self.attempt = 0;
        self.resync = false;
        let moved = !blocked || response.index != self.index;
        // 1 stands for "no index" (index 0 is never blocked on).
        let reset = self.index > 1 && response.index < self.index;
        // Never block on index 0: Consul would answer at once, forever.
        self.index = response.index.max(1);
        if moved {
            IndexEvent::Moved { response, reset }
        } else {
            IndexEvent::Same { index: response.index }
        }
    }

    /// Sends the next request once the backoff and the rate limit allow: whether it blocked,
    /// and its result. Cancel-safe: nothing changes until the request is sent.
    async fn request(&mut self) -> (bool, Result<Response, Error>) {
        if let Some(t) = self.not_before {
            tokio::time::sleep_until(t).await;
            self.not_before = None;
        }
        loop {
            match self.bucket.take(Instant::now()) {
                Ok(()) => break,
                Err(wait) => tokio::time::sleep(wait).await,
            }
        }
        if self.etcd.is_some() {
            let message = format!("the etcd watch of {} has no Consul index to follow; read it with Watch::next", self.path);
            return (false, Err(Error::Config(message)));
        }
        let blocking = (self.index > 0 && !self.resync).then(|| Blocking { index: self.index, wait: self.wait(Instant::now()) });
        (blocking.is_some(), self.client.get(&self.path, blocking).await)
    }

    /// The `wait` of the next blocking query (see [`WatchOptions::ramp_from`]).
    fn wait(&self, now: Instant) -> Duration {
        let full = self.opts.wait.min(MAX_WAIT);
        match self.opts.ramp_from {
            Some(first) => now.saturating_duration_since(self.born).clamp(first.min(full), full),
            None => full,
        }
    }

    /// The state machine: what a response or error means. `None`: nothing to report, loop.
    fn on_result(&mut self, result: Result<Response, Error>) -> Option<WatchEvent> {
        let resp = match result {
            Ok(r) => r,
            Err(error) => return Some(self.fail(error)),
        };
        let new_index = resp.index;
        self.resync = false;
        if self.last.is_some() && new_index == self.index && new_index > 0 {
            // Same index: nothing changed (a wait that ran out, or a spurious wake-up).
            self.attempt = 0;
            return None;
        }
        let went_back = new_index < self.index;
        if went_back {
            // A restored snapshot or another cluster: nothing of the last answer is trusted.
            self.kv_cache.clear();
        }
        let decoded = match self.query.decode(&resp, Some(&mut self.kv_cache)) {
            Ok(d) => d,
            // The index is kept: after the backoff we read again rather than block on data we
            // could not use.
            Err(error) => return Some(self.fail(error)),
        };
        self.attempt = 0;
        self.index = if went_back {
            tracing::info!(path = %self.path, old = self.index, new = new_index, "Consul index went backwards; reading afresh");
            0
        } else {
            // Never block on index 0: Consul would answer at once, forever.
            new_index.max(1)
        };
        if self.last.as_ref() == Some(&decoded.value) {
            return None;
        }
        self.last = Some(decoded.value.clone());
        Some(WatchEvent::Changed { value: decoded.value, index: new_index, skipped: decoded.skipped })
    }

    fn fail(&mut self, error: Error) -> WatchEvent {
        let retry_in = self.failed(&error, !matches!(error, Error::Decode { .. }));
        WatchEvent::Error { error, index: self.index, attempt: self.attempt, retry_in }
    }

    /// Counts a failure and schedules the retry (the next request waits `retry_in`, returned);
    /// `resync`: the next request must not block.
    fn failed(&mut self, error: &Error, resync: bool) -> Duration {
        self.attempt = self.attempt.saturating_add(1);
        let retry_in = self.opts.backoff.delay(self.attempt, &mut self.rng);
        self.not_before = Some(Instant::now() + retry_in);
        self.resync |= resync;
        tracing::debug!(path = %self.path, index = self.index, attempt = self.attempt, ?retry_in, "Consul watch error: {error}");
        retry_in
    }
}

/// A one-shot read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    pub value: WatchValue,
    pub index: u64,
    pub skipped: Vec<Skipped>,
}

/// Reads `query` once, without blocking (nginx start-up). Keeps no connection or task alive
/// after it returns beyond the client's idle pool, which is dropped with the client.
pub async fn fetch_once(client: &Client, query: &Query) -> Result<Fetched, Error> {
    if let Query::Etcd { api, prefix } = query {
        return crate::etcd::fetch_once(client, *api, prefix).await;
    }
    let r = client.get(&query.path(), None).await?;
    let d = query.decode(&r, None)?;
    Ok(Fetched { value: d.value, index: r.index, skipped: d.skipped })
}

#[derive(Debug)]
pub(crate) struct TokenBucket {
    capacity: f64,
    tokens: f64,
    per_second: f64,
    last: Instant,
}

impl TokenBucket {
    pub(crate) fn new(r: RateLimit) -> TokenBucket {
        let capacity = f64::from(r.burst.max(1));
        TokenBucket { capacity, tokens: capacity, per_second: r.per_second, last: Instant::now() }
    }

    /// Takes a token, or says how long until one is available.
    pub(crate) fn take(&mut self, now: Instant) -> Result<(), Duration> {
        if self.per_second.is_nan() || self.per_second <= 0.0 || self.per_second.is_infinite() {
            return Ok(());
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.per_second))
        }
    }
}

#[cfg(test)]
mod tests;
