//! etcd as a source of servers, in nginx-upsync-module's KV layout: one key per server,
//! `PREFIX/IP:PORT`, whose value is the JSON object Consul KV holds (decoded by the same code,
//! [`crate::decode::kv_endpoints_raw`]). Both of etcd's HTTP APIs:
//!
//! - **v2** (`/v2/keys`, nginx-upsync-module's `upsync_type=etcd`; etcd 3.4 and 3.5 serve it only
//!   with `--enable-v2`, etcd 3.6 not at all): a recursive `GET /v2/keys/PREFIX?recursive=true`
//!   gives the servers and `X-Etcd-Index`; a long poll `?wait=true&recursive=true&waitIndex=N+1`
//!   waits for the next change under the prefix, which is read afresh. etcd keeps the last 1,000
//!   events: a poll whose index is older is answered with error 401 ("event index cleared"), and
//!   the prefix is read afresh.
//! - **v3** through etcd's JSON gateway: `POST /v3/kv/range` over the prefix (keys and values in
//!   base64) gives the servers and the store's revision R; `POST /v3/watch` from R+1 streams
//!   every later change as one JSON message per line, applied to the keys held here. The watch
//!   resumes from the last revision seen when its connection breaks or another member takes
//!   over; when etcd has compacted that revision away it cancels the watch with
//!   `compact_revision`, and the prefix is read afresh.
//!
//! Several members: the client's addresses, tried in turn; a member that cannot be reached,
//! breaks the stream, has no leader (the v3 watch asks for one, `hasleader`, so a member cut off
//! from the cluster ends its watches) or answers with an error is left for the next one. The
//! requests go through [`Client::stream`] (the client's connections, TLS and failover); each
//! read is bounded by the client's `max_response_bytes`, and a message of the watch stream too.
//! A watch stream or long poll silent for the watch's `wait` is closed and opened again from
//! the same revision (a member stopped without closing its connections cannot hold it longer).
use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use serde::de::{self, Deserializer};
use serde::Deserialize;
use tokio::time::Instant;

use crate::client::{Client, Method, Stream};
use crate::config::ConsulAddr;
use crate::decode::{kv_endpoints_raw, DecodeError, Decoded};
use crate::endpoint::EndpointSet;
use crate::error::Error;
use crate::watch::{Fetched, TokenBucket, WatchEvent, WatchOptions, WatchValue};

/// Which of etcd's HTTP APIs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EtcdApi {
    /// `/v2/keys` (etcd 2, and 3.4/3.5 with `--enable-v2`).
    V2,
    /// The v3 API through etcd's JSON gateway (`/v3/kv/range`, `/v3/watch`).
    V3,
}

/// Characters escaped in a v2 key path (`/` is kept).
const PATH: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'/').remove(b'-').remove(b'_').remove(b'.').remove(b'~').remove(b':');

/// The key folder answers are decoded under: v2 keys begin with `/`; v3 keys are taken as the
/// prefix says.
fn dir(api: EtcdApi, prefix: &str) -> String {
    match api {
        EtcdApi::V2 => format!("/{}", prefix.trim_matches('/')),
        EtcdApi::V3 => prefix.trim_end_matches('/').to_string(),
    }
}

/// `/v2/keys/PREFIX` (percent-encoded).
fn v2_path(prefix: &str) -> String {
    format!("/v2/keys/{}", percent_encoding::utf8_percent_encode(prefix.trim_matches('/'), PATH))
}

/// The v3 key range of the servers under `prefix`: `PREFIX/` up to `PREFIX0` (`'/' + 1`); an
/// empty prefix is the whole store (`\0` to `\0`).
fn v3_range(prefix: &str) -> (Vec<u8>, Vec<u8>) {
    let p = prefix.trim_end_matches('/');
    if p.is_empty() {
        return (vec![0], vec![0]);
    }
    let key = format!("{p}/").into_bytes();
    let mut end = key.clone();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    (key, end)
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(what: &'static str, s: &str) -> Result<Vec<u8>, DecodeError> {
    base64::engine::general_purpose::STANDARD.decode(s).map_err(|e| DecodeError { what, message: format!("not base64 ({e})") })
}

// ---------------------------------------------------------------------------------------------
// Decoders (pure; tested with answers captured from etcd 3.5, discovery/testdata/etcd_*.json)

/// An int64 of the v3 gateway: a JSON string (`"12"`) or a number.
fn int<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Int<'a> {
        N(u64),
        S(&'a str),
    }
    match Int::deserialize(d)? {
        Int::N(n) => Ok(n),
        Int::S(s) => s.parse().map_err(|_| de::Error::custom(format!("{s:?} is not a revision"))),
    }
}

#[derive(Deserialize, Default)]
struct V2Node {
    #[serde(default)]
    key: String,
    #[serde(default)]
    dir: bool,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    nodes: Vec<V2Node>,
}

#[derive(Deserialize)]
struct V2Answer {
    node: V2Node,
}

/// A v2 error answer (`{"errorCode":100,"message":"Key not found","cause":"/x","index":7}`).
#[derive(Deserialize, Debug, Default)]
struct V2Error {
    #[serde(rename = "errorCode", default)]
    code: u64,
    #[serde(default)]
    message: String,
    #[serde(default)]
    cause: String,
}

/// v2's "Key not found".
const V2_KEY_NOT_FOUND: u64 = 100;
/// v2's "The event in requested index is outdated and cleared".
const V2_EVENT_INDEX_CLEARED: u64 = 401;

/// Decodes `GET /v2/keys/PREFIX?recursive=true` (`prefix` without `/v2/keys/`): the servers
/// under the folder, by the rules of Consul KV ([`crate::decode_kv`]: nested keys and bad names
/// or values are skipped with a reason). Folders are walked; a key holding a value at the
/// prefix itself is ignored.
pub fn decode_v2_keys(prefix: &str, body: &[u8]) -> Result<Decoded<EndpointSet>, DecodeError> {
    let answer: V2Answer =
        serde_json::from_slice(body).map_err(|e| DecodeError { what: "etcd v2 key listing", message: format!("invalid JSON ({e})") })?;
    let mut leaves: Vec<(&str, &[u8])> = Vec::new();
    fn walk<'a>(n: &'a V2Node, out: &mut Vec<(&'a str, &'a [u8])>) {
        if n.dir {
            for c in &n.nodes {
                walk(c, out);
            }
        } else {
            out.push((n.key.as_str(), n.value.as_deref().unwrap_or("").as_bytes()));
        }
    }
    walk(&answer.node, &mut leaves);
    Ok(kv_endpoints_raw(&dir(EtcdApi::V2, prefix), leaves.into_iter()))
}

/// A v3 key and its value (both decoded from base64).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Bytes,
    pub mod_revision: u64,
}

#[derive(Deserialize, Default)]
struct V3Header {
    #[serde(default, deserialize_with = "int")]
    revision: u64,
}

#[derive(Deserialize)]
struct V3Kv {
    #[serde(default)]
    key: String,
    #[serde(default)]
    value: String,
    #[serde(default, deserialize_with = "int")]
    mod_revision: u64,
}

impl V3Kv {
    fn decode(self, what: &'static str) -> Result<KeyValue, DecodeError> {
        let key = String::from_utf8_lossy(&unb64(what, &self.key)?).into_owned();
        Ok(KeyValue { key, value: Bytes::from(unb64(what, &self.value)?), mod_revision: self.mod_revision })
    }
}

#[derive(Deserialize)]
struct V3RangeAnswer {
    #[serde(default)]
    header: V3Header,
    #[serde(default)]
    kvs: Vec<V3Kv>,
    #[serde(default)]
    more: bool,
}

/// A v3 range read: the store's revision and the keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Range {
    pub revision: u64,
    pub kvs: Vec<KeyValue>,
}

/// Decodes the answer to `POST /v3/kv/range`.
pub fn decode_v3_range(body: &[u8]) -> Result<Range, DecodeError> {
    const WHAT: &str = "etcd v3 range";
    let a: V3RangeAnswer = serde_json::from_slice(body).map_err(|e| DecodeError { what: WHAT, message: format!("invalid JSON ({e})") })?;
    if a.more {
        return Err(DecodeError { what: WHAT, message: "the answer is incomplete (\"more\": true)".into() });
    }
    if a.header.revision == 0 {
        return Err(DecodeError { what: WHAT, message: "no revision in the header".into() });
    }
    let kvs = a.kvs.into_iter().map(|kv| kv.decode(WHAT)).collect::<Result<Vec<_>, _>>()?;
    Ok(Range { revision: a.header.revision, kvs })
}

#[derive(Deserialize)]
struct V3Event {
    #[serde(rename = "type", default)]
    kind: Option<serde_json::Value>,
    kv: Option<V3Kv>,
}

#[derive(Deserialize, Default)]
struct V3WatchResult {
    #[serde(default)]
    header: V3Header,
    #[serde(default)]
    created: bool,
    #[serde(default)]
    canceled: bool,
    #[serde(default, deserialize_with = "int")]
    compact_revision: u64,
    #[serde(default)]
    cancel_reason: String,
    #[serde(default)]
    events: Vec<V3Event>,
}

#[derive(Deserialize)]
struct V3WatchMessage {
    result: Option<V3WatchResult>,
    error: Option<serde_json::Value>,
}

/// One change of a v3 watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvEvent {
    Put(KeyValue),
    Delete { key: String, mod_revision: u64 },
}

/// One message of a v3 watch stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchMessage {
    /// The watch exists; `revision` is the store's.
    Created { revision: u64 },
    /// Changes, in order.
    Events { events: Vec<KvEvent> },
    /// No change since the last message; the watch has seen everything up to `revision`.
    Progress { revision: u64 },
    /// The revision the watch was to start from has been compacted away (the oldest one kept is
    /// `compact_revision`): read afresh.
    Compacted { compact_revision: u64 },
    /// Ended by the server for another reason (e.g. "etcdserver: no leader").
    Canceled { reason: String },
    /// The gateway reports an error on the stream.
    Error { message: String },
}

/// Decodes one line of `POST /v3/watch`.
pub fn decode_v3_watch(line: &[u8]) -> Result<WatchMessage, DecodeError> {
    const WHAT: &str = "etcd v3 watch message";
    let m: V3WatchMessage = serde_json::from_slice(line).map_err(|e| DecodeError { what: WHAT, message: format!("invalid JSON ({e})") })?;
    if let Some(e) = m.error {
        return Ok(WatchMessage::Error { message: gateway_message(&e) });
    }
    let Some(r) = m.result else { return Err(DecodeError { what: WHAT, message: "neither \"result\" nor \"error\"".into() }) };
    if r.compact_revision > 0 {
        return Ok(WatchMessage::Compacted { compact_revision: r.compact_revision });
    }
    if r.canceled {
        let reason = if r.cancel_reason.is_empty() { "no reason given".to_string() } else { r.cancel_reason };
        return Ok(WatchMessage::Canceled { reason });
    }
    if r.created {
        return Ok(WatchMessage::Created { revision: r.header.revision });
    }
    if r.events.is_empty() {
        return Ok(WatchMessage::Progress { revision: r.header.revision });
    }
    let mut events = Vec::with_capacity(r.events.len());
    for ev in r.events {
        let Some(kv) = ev.kv else { return Err(DecodeError { what: WHAT, message: "an event without \"kv\"".into() }) };
        // PUT is the enum's zero: the gateway leaves it out.
        let delete = match &ev.kind {
            None => false,
            Some(serde_json::Value::String(s)) if s == "PUT" => false,
            Some(serde_json::Value::String(s)) if s == "DELETE" => true,
            Some(serde_json::Value::Number(n)) if n.as_u64() == Some(0) => false,
            Some(serde_json::Value::Number(n)) if n.as_u64() == Some(1) => true,
            Some(other) => return Err(DecodeError { what: WHAT, message: format!("unknown event type {other}") }),
        };
        let kv = kv.decode(WHAT)?;
        events.push(if delete { KvEvent::Delete { key: kv.key, mod_revision: kv.mod_revision } } else { KvEvent::Put(kv) });
    }
    Ok(WatchMessage::Events { events })
}

/// The message of a gateway error: `{"error":"..","code":14,"message":".."}` (unary calls) or
/// the object inside a stream's `{"error":{"grpc_code":14,"message":".."}}`.
fn gateway_message(v: &serde_json::Value) -> String {
    // A stream's error object, also sent as the body of an HTTP error (`POST /v3/watch` on a
    // member without a leader: 503 `{"error":{"grpc_code":14,...,"message":"etcdserver: no leader"}}`).
    if let Some(inner) = v.get("error").filter(|e| e.is_object()) {
        return gateway_message(inner);
    }
    let text = v.get("message").and_then(|m| m.as_str()).or_else(|| v.get("error").and_then(|m| m.as_str())).or_else(|| v.as_str());
    match text {
        Some(t) => t.to_string(),
        None => short(v.to_string().as_bytes()),
    }
}

/// At most 300 characters of a body, on one line.
fn short(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(body);
    let one: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    match one.char_indices().nth(300) {
        Some((cut, _)) => format!("{}...", &one[..cut]),
        None if one.is_empty() => "(empty body)".into(),
        None => one,
    }
}

// ---------------------------------------------------------------------------------------------
// Errors in etcd's words

/// The client's errors (worded for Consul) reworded for etcd.
fn reword(e: Error) -> Error {
    let message = match &e {
        Error::Connect { message, .. } => {
            format!("cannot connect: {message}; check that etcd runs and listens there (--listen-client-urls)")
        }
        Error::Tls { message, .. } => {
            format!("TLS handshake failed: {message}; check the CA file, the server certificate's names and the client certificate")
        }
        Error::Timeout { method, path, after, .. } => format!("no answer to {method} {path} within {after:?}"),
        Error::Stalled { method, path, after, .. } => {
            format!("the answer to {method} {path} was not complete {after:?} after it began (stalled or trickling connection); the connection was closed")
        }
        Error::Transport { method, path, message, .. } => format!("HTTP exchange failed ({method} {path}): {message}"),
        Error::TooLarge { path, limit, .. } => {
            format!("the answer to {path} exceeds {limit} bytes; raise max_body or keep fewer keys under the prefix")
        }
        Error::Decode { path, error, .. } => format!("the answer to {path} cannot be used: {error}"),
        _ => return e,
    };
    match e.address() {
        Some(address) => Error::Etcd { address: address.clone(), message },
        None => e,
    }
}

/// An etcd error. The module counts errors by kind from their messages (after `etcd at
/// ADDRESS: `): `cannot connect`, `TLS handshake failed`, `no answer to` or `... was not
/// complete ...` (timeouts), `HTTP exchange failed` or `the member ended` (transport), `...
/// exceeds ...` (too large), `the answer to ... cannot be used` (decode), `...: HTTP NNN: ...`.
fn etcd_err(address: &ConsulAddr, message: String) -> Error {
    Error::Etcd { address: address.clone(), message }
}

/// A non-2xx answer: what etcd said, and what to do about the usual cases.
fn status_error(api: EtcdApi, address: &ConsulAddr, what: &str, status: u16, body: &[u8]) -> Error {
    let said = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) if v.get("errorCode").is_some() => {
            let e: V2Error = serde_json::from_value(v).unwrap_or_default();
            format!("{} (error {}{})", e.message, e.code, if e.cause.is_empty() { String::new() } else { format!(", {}", e.cause) })
        }
        Ok(v) => gateway_message(&v),
        Err(_) => short(body),
    };
    let hint = match (api, status) {
        (EtcdApi::V2, 404) => {
            "; the v2 API is not enabled on this member (etcd 3.4 and 3.5 need --enable-v2, etcd 3.6 has no v2 API): use the v3 API, upsync HOST:2379/v3/kv/PREFIX upsync_type=etcd"
        }
        (EtcdApi::V3, 404) => "; this server has no etcd v3 JSON gateway (etcd 3.3 and older name it /v3beta or /v3alpha)",
        (_, 401 | 403) => "; the member requires authentication, which upsync does not support yet",
        _ => "",
    };
    etcd_err(address, format!("{what}: HTTP {status}: {said}{hint}"))
}

// ---------------------------------------------------------------------------------------------
// Reads

/// The servers under the prefix and the index (v2) or revision (v3) they were read at.
struct Snapshot {
    /// v3: every key with its value (the watch applies its events to it); v2: empty.
    keys: BTreeMap<String, Bytes>,
    /// v2: the servers as read (each change is read afresh).
    v2: Option<Decoded<EndpointSet>>,
    index: u64,
}

/// Reads the prefix once (no waiting).
async fn read(client: &Client, api: EtcdApi, prefix: &str) -> Result<Snapshot, Error> {
    let limit = client.config().max_response_bytes;
    match api {
        EtcdApi::V2 => {
            let path = format!("{}?recursive=true&quorum=true", v2_path(prefix));
            let s = client.stream(Method::GET, &path, None, &[], Duration::ZERO).await.map_err(reword)?;
            let (status, address, index) = (s.status(), s.address().clone(), v2_index(&s));
            let body = s.read_to_end(limit).await.map_err(reword)?;
            let decoded = match status {
                200 => decode_v2_keys(prefix, &body)
                    .map_err(|e| etcd_err(&address, format!("the answer to GET {path} cannot be used: {e}")))?,
                404 if v2_error(&body).is_some_and(|e| e.code == V2_KEY_NOT_FOUND) => Decoded::default(),
                _ => return Err(status_error(api, &address, &format!("GET {path}"), status, &body)),
            };
            let Some(index) = index else {
                return Err(etcd_err(
                    &address,
                    format!("the answer to GET {path} cannot be used: it has no X-Etcd-Index header; is this etcd's v2 API?"),
                ));
            };
            Ok(Snapshot { keys: BTreeMap::new(), v2: Some(decoded), index })
        }
        EtcdApi::V3 => {
            let (key, end) = v3_range(prefix);
            let body = serde_json::json!({ "key": b64(&key), "range_end": b64(&end) }).to_string();
            let s = client.stream(Method::POST, "/v3/kv/range", Some(Bytes::from(body)), &[], Duration::ZERO).await.map_err(reword)?;
            let (status, address) = (s.status(), s.address().clone());
            let body = s.read_to_end(limit).await.map_err(reword)?;
            if status != 200 {
                return Err(status_error(api, &address, "POST /v3/kv/range", status, &body));
            }
            let range =
                decode_v3_range(&body).map_err(|e| etcd_err(&address, format!("the answer to POST /v3/kv/range cannot be used: {e}")))?;
            let keys = range.kvs.into_iter().map(|kv| (kv.key, kv.value)).collect();
            Ok(Snapshot { keys, v2: None, index: range.revision })
        }
    }
}

fn v2_index(s: &Stream) -> Option<u64> {
    s.header("x-etcd-index").and_then(|v| v.trim().parse().ok())
}

fn v2_error(body: &[u8]) -> Option<V2Error> {
    serde_json::from_slice::<V2Error>(body).ok().filter(|e| e.code != 0)
}

impl Snapshot {
    fn endpoints(&self, api: EtcdApi, prefix: &str) -> Decoded<EndpointSet> {
        match &self.v2 {
            Some(d) => d.clone(),
            None => kv_endpoints_raw(&dir(api, prefix), self.keys.iter().map(|(k, v)| (k.as_str(), v.as_ref()))),
        }
    }
}

/// Reads the servers under `prefix` once (nginx start-up with `strong_dependency=on`).
pub async fn fetch_once(client: &Client, api: EtcdApi, prefix: &str) -> Result<Fetched, Error> {
    let snap = read(client, api, prefix).await?;
    let d = snap.endpoints(api, prefix);
    Ok(Fetched { value: WatchValue::Endpoints(d.value), index: snap.index, skipped: d.skipped })
}

// ---------------------------------------------------------------------------------------------
// The watch

/// What the watch does next.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Read the whole prefix.
    Read,
    /// Wait for changes (v2 long poll, or v3 watch stream).
    Wait,
}

/// A v3 watch stream and the part of a message received so far.
struct Open {
    stream: Stream,
    buf: BytesMut,
}

/// A running watch of the servers under one etcd prefix, with the same contract as
/// [`crate::Watch`] (which runs it for [`crate::Query::Etcd`]): [`EtcdWatch::next`] yields the
/// first set, then every set that differs from the previous one, or an error after which the
/// last set stands; cancel-safe; dropping it closes its connection.
pub struct EtcdWatch {
    client: Client,
    api: EtcdApi,
    prefix: String,
    opts: WatchOptions,
    next: Next,
    /// v3: the keys under the prefix as of `index`, and their size (keys and values).
    keys: BTreeMap<String, Bytes>,
    held: usize,
    /// v2: the servers as last read.
    v2: Option<Decoded<EndpointSet>>,
    /// v2: the etcd index of the last read; v3: the last revision seen.
    index: u64,
    /// The keys changed since the last set was computed (v3).
    dirty: bool,
    open: Option<Open>,
    /// The open watch stream said "created" (v3).
    created: bool,
    last: Option<WatchValue>,
    attempt: u32,
    not_before: Option<Instant>,
    bucket: TokenBucket,
    rng: fastrand::Rng,
}

impl std::fmt::Debug for EtcdWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdWatch").field("api", &self.api).field("prefix", &self.prefix).field("index", &self.index).finish()
    }
}

/// What one step of the watch gave.
#[derive(Debug)]
enum Step {
    Yield(WatchEvent),
    Continue,
}

impl EtcdWatch {
    /// A watch of the servers under `prefix` (v2: the path after `/v2/keys/`; v3: the key
    /// prefix as stored, `/` and all, without the trailing `/`). No I/O before the first `next`.
    pub fn new(client: Client, api: EtcdApi, prefix: String, opts: WatchOptions) -> EtcdWatch {
        EtcdWatch {
            client,
            api,
            prefix,
            opts,
            next: Next::Read,
            keys: BTreeMap::new(),
            held: 0,
            v2: None,
            index: 0,
            dirty: false,
            open: None,
            created: false,
            last: None,
            attempt: 0,
            not_before: None,
            bucket: TokenBucket::new(opts.rate),
            rng: fastrand::Rng::new(),
        }
    }

    /// The etcd index (v2) or revision (v3) of the last set (0 before the first).
    pub fn index(&self) -> u64 {
        self.index
    }

    pub fn last(&self) -> Option<&WatchValue> {
        self.last.as_ref()
    }

    /// Waits for the next change or error.
    pub async fn next(&mut self) -> WatchEvent {
        loop {
            if let Some(t) = self.not_before {
                tokio::time::sleep_until(t).await;
                self.not_before = None;
            }
            let step = match self.next {
                Next::Read => self.read_step().await,
                Next::Wait => match self.api {
                    EtcdApi::V2 => self.v2_wait_step().await,
                    EtcdApi::V3 => self.v3_wait_step().await,
                },
            };
            match step {
                Ok(Step::Yield(ev)) => return ev,
                Ok(Step::Continue) => {}
                Err(e) => return self.fail(e),
            }
        }
    }

    /// After an error of the member in use, the next request goes to the next member (a member
    /// that answers but cannot serve, e.g. without a leader, would otherwise be asked again).
    fn leave(&self, e: &Error) {
        if let Some(a) = e.address() {
            self.client.fail_over(a);
        }
    }

    async fn token(&mut self) {
        loop {
            match self.bucket.take(Instant::now()) {
                Ok(()) => return,
                Err(wait) => tokio::time::sleep(wait).await,
            }
        }
    }

    async fn read_step(&mut self) -> Result<Step, Error> {
        self.token().await;
        self.open = None;
        let snap = read(&self.client, self.api, &self.prefix).await.inspect_err(|e| self.leave(e))?;
        self.attempt = 0;
        self.index = snap.index;
        self.held = snap.keys.iter().map(|(k, v)| k.len() + v.len()).sum();
        self.keys = snap.keys;
        self.v2 = snap.v2;
        self.next = Next::Wait;
        self.dirty = false;
        Ok(self.changed())
    }

    /// The set as it stands now, yielded if it differs from the last one.
    fn changed(&mut self) -> Step {
        let d = match &self.v2 {
            Some(d) => d.clone(),
            None => kv_endpoints_raw(&dir(self.api, &self.prefix), self.keys.iter().map(|(k, v)| (k.as_str(), v.as_ref()))),
        };
        let value = WatchValue::Endpoints(d.value);
        if self.last.as_ref() == Some(&value) {
            return Step::Continue;
        }
        self.last = Some(value.clone());
        Step::Yield(WatchEvent::Changed { value, index: self.index, skipped: d.skipped })
    }

    /// v2: one long poll for the next change under the prefix, bounded by the watch's `wait`.
    async fn v2_wait_step(&mut self) -> Result<Step, Error> {
        self.token().await;
        let path = format!("{}?wait=true&recursive=true&waitIndex={}", v2_path(&self.prefix), self.index + 1);
        let limit = self.client.config().max_response_bytes;
        let wait = self.opts.wait;
        let poll = async {
            // The head may come only with the change (etcd 3.5): the poll's own bound is `wait`.
            let s = self.client.stream(Method::GET, &path, None, &[], wait + Duration::from_secs(60)).await.map_err(reword)?;
            let (status, address) = (s.status(), s.address().clone());
            let body = s.read_to_end(limit).await.map_err(reword)?;
            Ok::<_, Error>((status, address, body))
        };
        let (status, address, body) = match tokio::time::timeout(wait, poll).await {
            Err(_) => {
                tracing::debug!(path, "etcd: no change within {wait:?}; polling again");
                return Ok(Step::Continue);
            }
            Ok(r) => r.inspect_err(|e| self.leave(e))?,
        };
        self.attempt = 0;
        match status {
            200 => tracing::debug!(path, "etcd: a change under the prefix; reading it"),
            400 if v2_error(&body).is_some_and(|e| e.code == V2_EVENT_INDEX_CLEARED) => tracing::info!(
                "etcd at {address}: the events after index {} are gone (etcd keeps the last 1000); reading /v2/keys/{} afresh",
                self.index,
                self.prefix
            ),
            _ => {
                let e = status_error(self.api, &address, &format!("GET {path}"), status, &body);
                self.client.fail_over(&address);
                return Err(e);
            }
        }
        self.next = Next::Read;
        Ok(Step::Continue)
    }

    /// v3: reads the watch stream (opening it from the last revision when needed) and applies
    /// its changes; yields the set when it differs from the last one and the rate allows.
    async fn v3_wait_step(&mut self) -> Result<Step, Error> {
        // A change is waiting for the rate limit: yield it when a token comes, reading the
        // stream meanwhile (later changes are folded into the same set).
        let mut deadline = Instant::now() + self.opts.wait;
        if self.dirty {
            match self.bucket.take(Instant::now()) {
                Ok(()) => {
                    self.dirty = false;
                    return Ok(self.changed());
                }
                Err(wait) => deadline = deadline.min(Instant::now() + wait),
            }
        }
        if self.open.is_none() {
            self.token().await;
            let (key, end) = v3_range(&self.prefix);
            let body = serde_json::json!({ "create_request": {
                "key": b64(&key), "range_end": b64(&end), "start_revision": self.index + 1, "progress_notify": true,
            }})
            .to_string();
            // hasleader: a member that loses its leader ends this watch (else it would hold it
            // and never see another change).
            let s = self
                .client
                .stream(Method::POST, "/v3/watch", Some(Bytes::from(body)), &[("grpc-metadata-hasleader", "true")], Duration::ZERO)
                .await
                .map_err(reword)
                .inspect_err(|e| self.leave(e))?;
            if s.status() != 200 {
                let address = s.address().clone();
                let status = s.status();
                let body = s.read_to_end(64 << 10).await.unwrap_or_default();
                self.client.fail_over(&address);
                return Err(status_error(self.api, &address, "POST /v3/watch", status, &body));
            }
            self.open = Some(Open { stream: s, buf: BytesMut::new() });
            self.created = false;
        }
        let Some(open) = self.open.as_mut() else { return Ok(Step::Continue) };
        let address = open.stream.address().clone();
        let line = match next_line(open, self.client.config().max_response_bytes, deadline).await {
            Ok(Some(line)) => line,
            Ok(None) if self.dirty => return Ok(Step::Continue),
            Ok(None) => {
                tracing::debug!("etcd at {address}: no message on the watch within {:?}; opening it again", self.opts.wait);
                self.open = None;
                return Ok(Step::Continue);
            }
            Err(e) => {
                self.open = None;
                self.client.fail_over(&address);
                return Err(reword(e));
            }
        };
        let message = match decode_v3_watch(&line) {
            Ok(m) => m,
            Err(e) => {
                self.open = None;
                self.client.fail_over(&address);
                return Err(etcd_err(&address, format!("the answer to POST /v3/watch cannot be used: {e}")));
            }
        };
        self.on_message(&address, message)
    }

    /// What a message of the watch stream means (the state machine; no I/O).
    fn on_message(&mut self, address: &ConsulAddr, message: WatchMessage) -> Result<Step, Error> {
        let created = self.created;
        match message {
            WatchMessage::Created { revision } => {
                self.created = true;
                self.attempt = 0;
                if revision < self.index {
                    // This member's store is behind what was read (a member still catching
                    // up, or a store restored from an older backup): read afresh.
                    tracing::info!("etcd at {address}: its revision {revision} is below {}; reading the prefix afresh", self.index);
                    self.next = Next::Read;
                }
            }
            WatchMessage::Events { events } if created => {
                for ev in events {
                    match ev {
                        KvEvent::Put(kv) => {
                            self.index = self.index.max(kv.mod_revision);
                            self.held += kv.key.len() + kv.value.len();
                            if let Some(old) = self.keys.insert(kv.key.clone(), kv.value) {
                                self.held = self.held.saturating_sub(kv.key.len() + old.len());
                            }
                        }
                        KvEvent::Delete { key, mod_revision } => {
                            self.index = self.index.max(mod_revision);
                            if let Some(old) = self.keys.remove(&key) {
                                self.held = self.held.saturating_sub(key.len() + old.len());
                            }
                        }
                    }
                }
                self.dirty = true;
                // The keys held are bounded like a read: past max_response_bytes, the watch
                // stops here and the prefix is read again (which refuses it until it fits).
                let limit = self.client.config().max_response_bytes;
                if self.held > limit {
                    self.open = None;
                    self.next = Next::Read;
                    return Err(etcd_err(
                        address,
                        format!("the size of the keys under the prefix exceeds {limit} bytes; raise max_body or keep fewer keys under the prefix"),
                    ));
                }
            }
            WatchMessage::Progress { revision } if created => self.index = self.index.max(revision),
            WatchMessage::Compacted { compact_revision } => {
                tracing::info!(
                    "etcd at {address}: revision {} was compacted (the oldest kept is {compact_revision}); reading the prefix afresh",
                    self.index + 1
                );
                self.next = Next::Read;
            }
            WatchMessage::Canceled { reason } => {
                self.open = None;
                self.client.fail_over(address);
                return Err(etcd_err(address, format!("the watch was canceled: {reason}")));
            }
            WatchMessage::Error { message } => {
                self.open = None;
                self.client.fail_over(address);
                return Err(etcd_err(address, format!("the watch failed: {message}")));
            }
            WatchMessage::Events { .. } | WatchMessage::Progress { .. } => {
                self.open = None;
                return Err(etcd_err(
                    address,
                    "the answer to POST /v3/watch cannot be used: it sent changes before the watch was created".into(),
                ));
            }
        }
        if self.next == Next::Read {
            self.open = None;
        }
        Ok(Step::Continue)
    }

    fn fail(&mut self, error: Error) -> WatchEvent {
        self.attempt = self.attempt.saturating_add(1);
        let retry_in = self.opts.backoff.delay(self.attempt, &mut self.rng);
        self.not_before = Some(Instant::now() + retry_in);
        tracing::debug!(prefix = %self.prefix, index = self.index, attempt = self.attempt, ?retry_in, "etcd watch error: {error}");
        WatchEvent::Error { error, index: self.index, attempt: self.attempt, retry_in }
    }
}

/// The next line of a watch stream (without its newline); `None` when `deadline` passes first.
/// A line longer than `limit` is an error, and so is the end of the stream.
async fn next_line(open: &mut Open, limit: usize, deadline: Instant) -> Result<Option<Bytes>, Error> {
    loop {
        if let Some(nl) = open.buf.iter().position(|&b| b == b'\n') {
            let line = open.buf.split_to(nl + 1).freeze().slice(..nl);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return Ok(Some(line));
        }
        if open.buf.len() > limit {
            let a = open.stream.address().clone();
            return Err(Error::TooLarge { address: a, path: "/v3/watch".into(), limit });
        }
        match tokio::time::timeout_at(deadline, open.stream.chunk()).await {
            Err(_) => return Ok(None),
            Ok(Ok(Some(data))) => open.buf.extend_from_slice(&data),
            Ok(Ok(None)) => {
                let a = open.stream.address().clone();
                return Err(etcd_err(&a, "the member ended the watch stream".into()));
            }
            Ok(Err(e)) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests;
