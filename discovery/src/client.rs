//! The Consul HTTP client: failover across addresses, ACL token, TLS, datacenter and
//! consistency, keep-alive connections, blocking-query parameters.
//!
//! Each request runs entirely inside the caller's future: the connection is driven by the
//! same future that sends the request (no `tokio::spawn`, no background task, no thread of
//! our own), so it works on a current-thread runtime, and dropping the future closes the
//! connection at once. Idle keep-alive connections wait in a small per-address pool.
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use bytes::BytesMut;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::header::{HeaderValue, CONTENT_TYPE, HOST, USER_AGENT};
use hyper::Request;
use hyper_util::rt::TokioIo;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::rustls;
use tokio_rustls::TlsConnector;

use crate::agent::{AgentCheck, AgentService, ServiceRegistration, Status};
use crate::config::{Consistency, ConsulAddr, ConsulConfig, Scheme, Secret, TlsOptions};
use crate::endpoint::Host;
use crate::error::Error;

pub use hyper::Method;

// Answers read as they arrive (etcd's watch streams and long polls).
mod stream;
pub use stream::Stream;

/// Longest `wait` Consul accepts for a blocking query.
pub const MAX_WAIT: Duration = Duration::from_secs(600);

/// Blocking-query parameters: return when the result's index exceeds `index`, or after
/// `wait` (capped at 10 minutes; Consul adds up to `wait/16` of jitter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Blocking {
    pub index: u64,
    pub wait: Duration,
}

/// A response from Consul: its `X-Consul-Index` (0 when absent), the status (2xx or 404),
/// the body and the address that answered.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Response {
    pub index: u64,
    pub status: u16,
    pub body: Bytes,
    pub address: ConsulAddr,
    /// `X-Consul-KnownLeader` (false when the answering server knows no leader).
    pub known_leader: bool,
}

/// One entry of the KV store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvPair {
    pub key: String,
    pub value: Bytes,
    pub flags: u64,
    pub create_index: u64,
    pub modify_index: u64,
    pub lock_index: u64,
    pub session: Option<String>,
}

/// A Consul client. Cheap to clone (the connection pool and settings are shared).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: ConsulConfig,
    token: TokenSource,
    tls: Option<TlsConnector>,
    /// Index into `cfg.addresses` of the address that answered last.
    current: AtomicUsize,
    /// Idle keep-alive connections, per address.
    pool: Mutex<Vec<Vec<Conn>>>,
    /// One permit per open connection when `cfg.max_connections` is set.
    slots: Option<Arc<Semaphore>>,
    /// Signalled when a connection goes back to the idle pool.
    returned: Notify,
}

/// What [`Client::acquire`] found.
enum Acquired {
    Idle(Conn),
    New(Option<OwnedSemaphorePermit>),
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.inner.cfg;
        f.debug_struct("Client")
            .field("addresses", &c.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>())
            .field("token", &c.token) // Secret: prints <redacted>
            .field("token_file", &c.token_file)
            .field("tls", &c.tls)
            .field("datacenter", &c.datacenter)
            .field("consistency", &c.consistency)
            .finish()
    }
}

/// Idle connections kept per address.
const MAX_IDLE_PER_ADDRESS: usize = 8;
/// An idle connection older than this is closed rather than reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest Consul message quoted in an error.
const MAX_MESSAGE: usize = 400;

/// TCP keepalive on every Consul connection: the first probe after this much silence...
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
/// ...then one probe per interval...
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// ...and the connection is dropped after this many unanswered probes.
pub const KEEPALIVE_PROBES: u32 = 3;
/// Longest time a connection whose peer vanished without a FIN or RST (host powered off,
/// network partition, a NAT or firewall that forgot the flow) goes unnoticed, whether it is idle
/// in the pool, waiting in a blocking query, or has unacknowledged data in flight
/// (`TCP_USER_TIMEOUT`, set to the same bound): 5 s + 3 x 2 s. A blocking query holds its
/// connection silent for up to 10 minutes, so this, not the query's own bound, is how long a
/// watch on a vanished Consul goes on waiting. The probes are answered by the peer's kernel, not
/// by Consul: two small packets per connection every 5 s while it is quiet.
pub const HALF_OPEN_BOUND: Duration = Duration::from_secs(5 + 3 * 2);

impl Client {
    /// Checks `cfg`, loads the TLS files and the token file. Does no network I/O and needs no
    /// runtime; requests need a tokio runtime with I/O and time enabled (current-thread is fine).
    pub fn new(cfg: ConsulConfig) -> Result<Client, Error> {
        cfg.validate()?;
        let needs_tls = cfg.addresses.iter().any(|a| a.scheme == Scheme::Https);
        let tls = match (&cfg.tls, needs_tls) {
            (Some(t), _) => Some(tls_connector(t)?),
            (None, true) => Some(tls_connector(&TlsOptions::default())?),
            (None, false) => None,
        };
        let token = match (&cfg.token, &cfg.token_file) {
            (Some(t), _) => TokenSource::Static(t.clone()),
            (None, Some(p)) => TokenSource::file(p)?,
            (None, None) => TokenSource::None,
        };
        let pool = Mutex::new((0..cfg.addresses.len()).map(|_| Vec::new()).collect());
        let slots = cfg.max_connections.map(|n| Arc::new(Semaphore::new(n)));
        Ok(Client { inner: Arc::new(Inner { cfg, token, tls, current: AtomicUsize::new(0), pool, slots, returned: Notify::new() }) })
    }

    pub fn config(&self) -> &ConsulConfig {
        &self.inner.cfg
    }

    /// The address requests go to first (the last one that answered).
    pub fn current_address(&self) -> &ConsulAddr {
        let c = &self.inner.cfg.addresses;
        &c[self.inner.current.load(Ordering::Relaxed) % c.len()]
    }

    /// `GET path_and_query` (e.g. `/v1/health/service/web?tag=v1`), adding the token, `dc`
    /// and the consistency mode (on `/v1/kv`, `/v1/catalog`, `/v1/health`, `/v1/internal/ui`), and `index`/`wait`
    /// when `blocking` is given. 2xx and 404 are `Ok` (Consul answers 404 for a KV prefix with no
    /// keys, with an index to block on); other statuses are errors.
    pub async fn get(&self, path_and_query: &str, blocking: Option<Blocking>) -> Result<Response, Error> {
        self.request(Method::GET, path_and_query, None, blocking).await
    }

    /// Any request. Like [`Client::get`]; `dc` is added to KV/catalog/health paths for all
    /// methods, the consistency mode only to reads.
    pub async fn request(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Bytes>,
        blocking: Option<Blocking>,
    ) -> Result<Response, Error> {
        if !path_and_query.starts_with('/') {
            return Err(Error::Config(format!("request path `{path_and_query}` must start with `/`")));
        }
        let path = self.full_path(&method, path_and_query, blocking);
        let mut timeout = self.inner.cfg.request_timeout;
        if let Some(b) = blocking {
            let wait = b.wait.min(MAX_WAIT);
            timeout += wait + wait / 16;
        }
        let body = body.unwrap_or_default();
        let n = self.inner.cfg.addresses.len();
        let start = self.inner.current.load(Ordering::Relaxed) % n;
        let mut k = 0;
        loop {
            let i = (start + k) % n;
            let result = self.exchange(i, &method, &path, &body, timeout).await;
            match result {
                Ok(resp) => {
                    if i != start {
                        self.inner.current.store(i, Ordering::Relaxed);
                        tracing::info!(address = %resp.address, "Consul: now using {}", resp.address);
                    }
                    return Ok(resp);
                }
                Err(e) if k + 1 < n && e.should_fail_over() && (method == Method::GET || not_sent(&e)) => {
                    tracing::warn!(error = %e, "Consul: trying the next address");
                    k += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn full_path(&self, method: &Method, path_and_query: &str, blocking: Option<Blocking>) -> String {
        let cfg = &self.inner.cfg;
        let mut path = path_and_query.to_string();
        let mut sep = if path.contains('?') { '&' } else { '?' };
        let mut add = |path: &mut String, param: &str| {
            path.push(sep);
            path.push_str(param);
            sep = '&';
        };
        let bare = path_and_query.split('?').next().unwrap_or("");
        let data_path = ["/v1/kv/", "/v1/catalog/", "/v1/health/", "/v1/internal/ui/"].iter().any(|p| bare.starts_with(p));
        if data_path {
            if let Some(dc) = &cfg.datacenter {
                add(&mut path, &format!("dc={dc}"));
            }
            if *method == Method::GET {
                match cfg.consistency {
                    Consistency::Default => {}
                    Consistency::Stale => add(&mut path, "stale"),
                    Consistency::Consistent => add(&mut path, "consistent"),
                }
            }
        }
        if let Some(b) = blocking {
            add(&mut path, &format!("index={}&wait={}", b.index, crate::duration::format_go(b.wait.min(MAX_WAIT))));
        }
        path
    }

    /// One request to address `i`, on a pooled connection or a new one; a pooled connection
    /// that turns out to be dead is replaced once.
    async fn exchange(&self, i: usize, method: &Method, path: &str, body: &Bytes, timeout: Duration) -> Result<Response, Error> {
        let address = &self.inner.cfg.addresses[i];
        // Waiting for a free connection (max_connections) is not Consul being slow: it happens
        // before the request's clock starts.
        let (mut reused, mut slot) = match self.acquire(i, true).await {
            Acquired::Idle(c) => (Some(c), None),
            Acquired::New(p) => (None, p),
        };
        let started = Instant::now();
        let attempt = async {
            loop {
                let mut conn = self.next_conn(i, &mut reused, &mut slot).await?;
                let req = self.build_request(address, method, path, body)?;
                match send(&mut conn.0, req, self.inner.cfg.max_response_bytes, self.inner.cfg.request_timeout).await {
                    Ok(r) => {
                        if r.reusable {
                            self.checkin(i, conn.0);
                        }
                        return Ok(r);
                    }
                    Err(SendError::NotSent(_)) if conn.1 => continue,
                    Err(SendError::Failed(_)) if conn.1 && *method == Method::GET => continue,
                    Err(SendError::Stalled) => {
                        return Err(Error::Stalled {
                            address: address.clone(),
                            method: method.to_string(),
                            path: path.to_string(),
                            after: self.inner.cfg.request_timeout,
                        })
                    }
                    Err(SendError::TooLarge) => {
                        return Err(Error::TooLarge {
                            address: address.clone(),
                            path: path.to_string(),
                            limit: self.inner.cfg.max_response_bytes,
                        })
                    }
                    Err(SendError::NotSent(m) | SendError::Failed(m))
                        if address.scheme == Scheme::Https && (m.contains("alert") || m.contains("certificate")) =>
                    {
                        return Err(Error::Tls { address: address.clone(), message: m })
                    }
                    // A new TLS connection closed before our request went out: the server
                    // dropped it right after the handshake (with TLS 1.3 a refused client
                    // certificate shows up only now, and hyper may not surface the alert).
                    Err(SendError::NotSent(m)) if !conn.1 && address.scheme == Scheme::Https => {
                        return Err(Error::Tls {
                            address: address.clone(),
                            message: format!(
                                "the server closed the connection right after the handshake ({m}); it may require a client certificate or refuse this one"
                            ),
                        })
                    }
                    Err(SendError::NotSent(m) | SendError::Failed(m)) => {
                        return Err(Error::Transport {
                            address: address.clone(),
                            method: method.to_string(),
                            path: path.to_string(),
                            message: m,
                        })
                    }
                }
            }
        };
        let raw = match tokio::time::timeout(timeout, attempt).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(Error::Timeout { address: address.clone(), method: method.to_string(), path: path.to_string(), after: timeout })
            }
        };
        let status = raw.status.as_u16();
        let index = match consul_index(&raw.headers) {
            Ok(i) => i.unwrap_or(0),
            // Only reads need the index (a watch blocks on it); a write that went through is
            // not failed because of a header it does not use.
            Err(bad) if *method == Method::GET && ((200..300).contains(&status) || status == 404) => {
                return Err(Error::Decode {
                    address: address.clone(),
                    path: path.to_string(),
                    error: crate::decode::DecodeError {
                        what: "X-Consul-Index header",
                        message: format!(
                            "{bad:?} is not a Consul index (a whole number below 2^64); the answer is not used and the last one is kept; check what sits between this client and Consul"
                        ),
                    },
                })
            }
            Err(_) => 0,
        };
        let known_leader = raw.headers.get("x-consul-knownleader").map(|v| v.as_bytes() != b"false").unwrap_or(true);
        tracing::debug!(address = %address, %method, path, status, index, elapsed_ms = started.elapsed().as_millis() as u64, "Consul request");
        if (200..300).contains(&status) || status == 404 {
            return Ok(Response { index, status, body: raw.body, address: address.clone(), known_leader });
        }
        let message = consul_message(&raw.body);
        let is_acl = status == 401
            || status == 403
            || ["permission denied", "acl not found", "acl token"].iter().any(|m| message.to_ascii_lowercase().contains(m));
        if is_acl {
            self.inner.token.refresh();
            return Err(Error::AclDenied { address: address.clone(), method: method.to_string(), path: path.to_string(), status, message });
        }
        Err(Error::Http { address: address.clone(), method: method.to_string(), path: path.to_string(), status, message })
    }

    fn build_request(&self, address: &ConsulAddr, method: &Method, path: &str, body: &Bytes) -> Result<Request<Full<Bytes>>, Error> {
        let mut b = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(HOST, address.authority())
            .header(USER_AGENT, concat!("upsync-discovery/", env!("CARGO_PKG_VERSION")));
        if !body.is_empty() {
            b = b.header(CONTENT_TYPE, "application/json");
        }
        if let Some(token) = self.inner.token.current() {
            if !token.is_empty() {
                let mut v = HeaderValue::from_str(token.expose())
                    .map_err(|_| Error::Config("the ACL token contains characters not allowed in an HTTP header".into()))?;
                v.set_sensitive(true);
                b = b.header("X-Consul-Token", v);
            }
        }
        b.body(Full::new(body.clone())).map_err(|e| Error::Config(format!("cannot build a request for `{path}`: {e}")))
    }

    async fn connect(&self, address: &ConsulAddr) -> Result<Conn, Error> {
        let fail = |message: String| Error::Connect { address: address.clone(), message };
        let work = async {
            let targets: Vec<SocketAddr> = match &address.host {
                // IP literals are never resolved.
                Host::Ip(ip) => vec![SocketAddr::new(*ip, address.port)],
                Host::Name(n) => tokio::net::lookup_host((n.as_str(), address.port))
                    .await
                    .map_err(|e| fail(format!("cannot resolve `{n}`: {e}")))?
                    .collect(),
            };
            let mut last = String::from("no address to connect to");
            let mut tcp = None;
            for t in targets {
                match TcpStream::connect(t).await {
                    Ok(s) => {
                        tcp = Some(s);
                        break;
                    }
                    Err(e) => last = format!("{t}: {e}"),
                }
            }
            let tcp = tcp.ok_or_else(|| fail(last))?;
            let _ = tcp.set_nodelay(true);
            if let Err(e) = set_keepalive(&tcp) {
                // Not fatal: the request timeouts still bound every exchange.
                tracing::warn!(address = %address, "Consul: cannot enable TCP keepalive ({e}); a dead peer is then noticed only by the request timeout");
            }
            let io: Box<dyn IoStream> = match address.scheme {
                Scheme::Http => Box::new(tcp),
                Scheme::Https => {
                    let tls = self.inner.tls.as_ref().ok_or_else(|| Error::Config("an https:// address needs TLS options".into()))?;
                    let name = server_name(address, self.inner.cfg.tls.as_ref())?;
                    let s = tls.connect(name, tcp).await.map_err(|e| Error::Tls { address: address.clone(), message: e.to_string() })?;
                    Box::new(s)
                }
            };
            let shared = Arc::new(IoShared::default());
            let io = RecordErrors { inner: io, shared: shared.clone() };
            let (sender, driver) =
                http1::Builder::new().handshake(TokioIo::new(io)).await.map_err(|e| fail(format!("HTTP handshake: {e}")))?;
            Ok(Conn { sender, driver: Box::pin(driver), idle_since: Instant::now(), shared, slot: None })
        };
        match tokio::time::timeout(self.inner.cfg.connect_timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(fail(format!("no connection within {:?}", self.inner.cfg.connect_timeout))),
        }
    }

    /// An idle connection to address `i` (if `reuse`), else a permit to open a new one (`None`
    /// when connections are not bounded). When no permit is free, an idle connection (to any
    /// address) is closed to free one; when none is idle either, waits until a connection in
    /// use is returned to the pool or closed.
    async fn acquire(&self, i: usize, reuse: bool) -> Acquired {
        let Some(slots) = self.inner.slots.as_ref() else {
            return match if reuse { self.checkout(i).await } else { None } {
                Some(c) => Acquired::Idle(c),
                None => Acquired::New(None),
            };
        };
        loop {
            // Registered before looking, so a connection returned meanwhile wakes us.
            let returned = self.inner.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            if reuse {
                if let Some(c) = self.checkout(i).await {
                    return Acquired::Idle(c);
                }
            }
            if let Ok(p) = slots.clone().try_acquire_owned() {
                return Acquired::New(Some(p));
            }
            let evicted = {
                let mut pool = self.inner.pool.lock().unwrap_or_else(|e| e.into_inner());
                pool.iter_mut().find_map(|v| (!v.is_empty()).then(|| v.remove(0)))
            };
            if let Some(c) = evicted {
                // Dropping it closes it and frees its permit.
                drop(c);
                continue;
            }
            tokio::select! {
                p = slots.clone().acquire_owned() => if let Ok(p) = p { return Acquired::New(Some(p)) },
                _ = returned => {}
            }
        }
    }

    /// The connection for the next try of an exchange with address `i`: the idle one it was
    /// given (`reused`, then true), else a new one under `slot` or, once that was spent, under a
    /// new permit.
    async fn next_conn(&self, i: usize, reused: &mut Option<Conn>, slot: &mut Option<OwnedSemaphorePermit>) -> Result<(Conn, bool), Error> {
        if let Some(c) = reused.take() {
            return Ok((c, true));
        }
        let permit = match slot.take() {
            Some(p) => Some(p),
            None => match self.acquire(i, false).await {
                Acquired::New(p) => p,
                Acquired::Idle(_) => None,
            },
        };
        let mut c = self.connect(&self.inner.cfg.addresses[i]).await?;
        c.slot = permit;
        Ok((c, false))
    }

    /// An idle pooled connection to address `i` that is still open, if any.
    async fn checkout(&self, i: usize) -> Option<Conn> {
        loop {
            let mut c = {
                let mut pool = self.inner.pool.lock().unwrap_or_else(|e| e.into_inner());
                pool.get_mut(i)?.pop()?
            };
            if c.idle_since.elapsed() > IDLE_TIMEOUT || c.sender.is_closed() {
                continue;
            }
            // Poll the idle connection once: if the server closed it, the driver finishes now.
            let finished = std::future::poll_fn(|cx| Poll::Ready(c.driver.as_mut().poll(cx).is_ready())).await;
            if !finished {
                return Some(c);
            }
        }
    }

    fn checkin(&self, i: usize, mut c: Conn) {
        c.idle_since = Instant::now();
        {
            let mut pool = self.inner.pool.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(v) = pool.get_mut(i) {
                if v.len() < MAX_IDLE_PER_ADDRESS {
                    v.push(c);
                }
            }
        }
        // A request waiting for a connection (max_connections) can take this one.
        self.inner.returned.notify_one();
    }

    // ----- KV ----------------------------------------------------------------------------

    /// `PUT /v1/kv/KEY` with `value`; with `cas`, only if the key's ModifyIndex is `cas`
    /// (0: only if it does not exist). `Ok(false)` when the CAS did not match.
    pub async fn kv_put(&self, key: &str, value: &[u8], cas: Option<u64>) -> Result<bool, Error> {
        let mut path = kv_path(key);
        if let Some(c) = cas {
            path.push_str(&format!("?cas={c}"));
        }
        let r = self.expect_found(Method::PUT, &path, Some(Bytes::copy_from_slice(value))).await?;
        parse_bool(&r)
    }

    /// The entry at `key`, `None` when it does not exist.
    pub async fn kv_get(&self, key: &str) -> Result<Option<KvPair>, Error> {
        let r = self.get(&kv_path(key), None).await?;
        if r.status == 404 {
            return Ok(None);
        }
        Ok(decode_kv_pairs(&r)?.into_iter().next())
    }

    /// Every entry whose key starts with `prefix` (Consul's `?recurse`: a string prefix, so
    /// `a/b` also lists `a/bc`; end it with `/` for one folder). Empty when none.
    pub async fn kv_list(&self, prefix: &str) -> Result<Vec<KvPair>, Error> {
        let r = self.get(&format!("{}?recurse", kv_path(prefix)), None).await?;
        if r.status == 404 {
            return Ok(Vec::new());
        }
        decode_kv_pairs(&r)
    }

    /// `DELETE /v1/kv/KEY`; with `cas`, only if its ModifyIndex is `cas` (`Ok(false)` when not).
    /// Deleting a missing key succeeds.
    pub async fn kv_delete(&self, key: &str, cas: Option<u64>) -> Result<bool, Error> {
        if key.trim_matches('/').is_empty() {
            return Err(Error::Config("refusing to delete an empty KV key".into()));
        }
        let mut path = kv_path(key);
        if let Some(c) = cas {
            path.push_str(&format!("?cas={c}"));
        }
        let r = self.expect_found(Method::DELETE, &path, None).await?;
        parse_bool(&r)
    }

    /// Deletes every key starting with `prefix` (a string prefix, like [`Client::kv_list`]).
    /// An empty prefix (the whole store) is refused.
    pub async fn kv_delete_prefix(&self, prefix: &str) -> Result<(), Error> {
        if prefix.trim_matches('/').is_empty() {
            return Err(Error::Config("refusing to delete the whole KV store (empty prefix)".into()));
        }
        let r = self.expect_found(Method::DELETE, &format!("{}?recurse", kv_path(prefix)), None).await?;
        parse_bool(&r).map(|_| ())
    }

    // ----- agent -------------------------------------------------------------------------

    /// `PUT /v1/agent/service/register` (with `?replace-existing-checks` when asked).
    pub async fn register_service(&self, reg: &ServiceRegistration) -> Result<(), Error> {
        let body = reg.to_json()?;
        let path = if reg.replace_existing_checks {
            "/v1/agent/service/register?replace-existing-checks=true"
        } else {
            "/v1/agent/service/register"
        };
        self.expect_found(Method::PUT, path, Some(Bytes::from(body))).await.map(|_| ())
    }

    /// `PUT /v1/agent/service/deregister/ID`. An unknown ID is an error (HTTP 404 from Consul).
    pub async fn deregister_service(&self, id: &str) -> Result<(), Error> {
        self.expect_found(Method::PUT, &format!("/v1/agent/service/deregister/{}", seg(id)), None).await.map(|_| ())
    }

    /// Sets a TTL check's status, with `note` as its output (`PUT /v1/agent/check/update/ID`).
    pub async fn check_update(&self, check_id: &str, status: Status, note: Option<&str>) -> Result<(), Error> {
        let body = serde_json::json!({ "Status": status.as_str(), "Output": note.unwrap_or("") }).to_string();
        self.expect_found(Method::PUT, &format!("/v1/agent/check/update/{}", seg(check_id)), Some(Bytes::from(body))).await.map(|_| ())
    }

    /// Puts a service in (or out of) maintenance mode: Consul adds a critical check, so health
    /// watches see it down and DNS stops returning it.
    pub async fn service_maintenance(&self, id: &str, enable: bool, reason: Option<&str>) -> Result<(), Error> {
        let mut path = format!("/v1/agent/service/maintenance/{}?enable={enable}", seg(id));
        if let Some(r) = reason {
            path.push_str("&reason=");
            path.push_str(&utf8_percent_encode(r, QUERY).to_string());
        }
        self.expect_found(Method::PUT, &path, None).await.map(|_| ())
    }

    /// The services registered with this agent, by ID.
    pub async fn agent_services(&self) -> Result<std::collections::BTreeMap<String, AgentService>, Error> {
        let r = self.expect_found(Method::GET, "/v1/agent/services", None).await?;
        decode_json(&r, "/v1/agent/services")
    }

    /// The checks registered with this agent, by check ID.
    pub async fn agent_checks(&self) -> Result<std::collections::BTreeMap<String, AgentCheck>, Error> {
        let r = self.expect_found(Method::GET, "/v1/agent/checks", None).await?;
        decode_json(&r, "/v1/agent/checks")
    }

    /// `GET /v1/agent/self` as JSON.
    pub async fn agent_self(&self) -> Result<serde_json::Value, Error> {
        let r = self.expect_found(Method::GET, "/v1/agent/self", None).await?;
        decode_json(&r, "/v1/agent/self")
    }

    /// The agent's node name (`Config.NodeName` of `/v1/agent/self`).
    pub async fn node_name(&self) -> Result<String, Error> {
        let v = self.agent_self().await?;
        v.pointer("/Config/NodeName").and_then(|n| n.as_str()).map(str::to_string).ok_or_else(|| Error::Decode {
            address: self.current_address().clone(),
            path: "/v1/agent/self".into(),
            error: crate::decode::DecodeError { what: "agent self", message: "no Config.NodeName".into() },
        })
    }

    /// A request whose 404 is an error too.
    async fn expect_found(&self, method: Method, path: &str, body: Option<Bytes>) -> Result<Response, Error> {
        let r = self.request(method.clone(), path, body, None).await?;
        if r.status == 404 {
            return Err(Error::Http {
                address: r.address.clone(),
                method: method.to_string(),
                path: path.to_string(),
                status: 404,
                message: consul_message(&r.body),
            });
        }
        Ok(r)
    }
}

// ----- helpers -----------------------------------------------------------------------------

fn not_sent(e: &Error) -> bool {
    matches!(e, Error::Connect { .. } | Error::Tls { .. }) || matches!(e, Error::Http { status, .. } if *status >= 500 || *status == 429)
}

/// Characters escaped in a KV key or ID path segment (`/` is kept in keys).
const PATH: &AsciiSet = &NON_ALPHANUMERIC.remove(b'/').remove(b'-').remove(b'_').remove(b'.').remove(b'~').remove(b':');
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~').remove(b':');
const QUERY: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

pub(crate) fn kv_path(key: &str) -> String {
    format!("/v1/kv/{}", utf8_percent_encode(key.trim_start_matches('/'), PATH))
}

pub(crate) fn seg(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

pub(crate) fn query_value(s: &str) -> String {
    utf8_percent_encode(s, QUERY).to_string()
}

/// `X-Consul-Index`: `Ok(None)` when absent, `Err(value)` (cut to 64 characters) when present
/// but not a `u64` (empty, negative, not a number, above 2^64-1).
fn consul_index(h: &hyper::HeaderMap) -> Result<Option<u64>, String> {
    let Some(v) = h.get("x-consul-index") else { return Ok(None) };
    let text = String::from_utf8_lossy(v.as_bytes());
    match text.trim().parse::<u64>() {
        Ok(i) if !text.trim().starts_with('+') => Ok(Some(i)),
        _ => Err(text.chars().take(64).collect()),
    }
}

/// Consul's error bodies are plain text; keep one line of at most MAX_MESSAGE characters.
fn consul_message(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(body);
    let s = s.trim();
    if s.is_empty() {
        return "(empty body)".into();
    }
    let one_line: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(MAX_MESSAGE) {
        Some((cut, _)) => format!("{}...", &one_line[..cut]),
        None => one_line,
    }
}

fn parse_bool(r: &Response) -> Result<bool, Error> {
    match r.body.trim_ascii() {
        b"true" => Ok(true),
        b"false" => Ok(false),
        _ => Err(Error::Decode {
            address: r.address.clone(),
            path: String::new(),
            error: crate::decode::DecodeError {
                what: "KV write result",
                message: format!("expected true or false, got {:?}", consul_message(&r.body)),
            },
        }),
    }
}

fn decode_json<T: serde::de::DeserializeOwned>(r: &Response, path: &str) -> Result<T, Error> {
    serde_json::from_slice(&r.body).map_err(|e| Error::Decode {
        address: r.address.clone(),
        path: path.to_string(),
        error: crate::decode::DecodeError { what: "agent response", message: format!("invalid JSON ({e})") },
    })
}

#[derive(serde::Deserialize)]
struct RawKvPair {
    #[serde(rename = "Key")]
    key: String,
    #[serde(rename = "Value", default)]
    value: Option<String>,
    #[serde(rename = "Flags", default)]
    flags: u64,
    #[serde(rename = "CreateIndex", default)]
    create_index: u64,
    #[serde(rename = "ModifyIndex", default)]
    modify_index: u64,
    #[serde(rename = "LockIndex", default)]
    lock_index: u64,
    #[serde(rename = "Session", default)]
    session: Option<String>,
}

fn decode_kv_pairs(r: &Response) -> Result<Vec<KvPair>, Error> {
    use base64::Engine as _;
    let raw: Vec<RawKvPair> = decode_json(r, "/v1/kv")?;
    raw.into_iter()
        .map(|p| {
            let value = match p.value {
                None => Bytes::new(),
                Some(v) => Bytes::from(base64::engine::general_purpose::STANDARD.decode(v).map_err(|e| Error::Decode {
                    address: r.address.clone(),
                    path: kv_path(&p.key),
                    error: crate::decode::DecodeError { what: "KV entry", message: format!("value is not base64 ({e})") },
                })?),
            };
            Ok(KvPair {
                key: p.key,
                value,
                flags: p.flags,
                create_index: p.create_index,
                modify_index: p.modify_index,
                lock_index: p.lock_index,
                session: p.session,
            })
        })
        .collect()
}

// ----- ACL token ---------------------------------------------------------------------------

enum TokenSource {
    None,
    Static(Secret),
    /// Re-read when the file's modification time changes.
    File {
        path: PathBuf,
        state: Mutex<(Option<SystemTime>, Secret)>,
    },
}

impl TokenSource {
    fn file(path: &Path) -> Result<TokenSource, Error> {
        let (mtime, token) = read_token_file(path).map_err(Error::Config)?;
        Ok(TokenSource::File { path: path.to_path_buf(), state: Mutex::new((mtime, token)) })
    }

    fn current(&self) -> Option<Secret> {
        match self {
            TokenSource::None => None,
            TokenSource::Static(s) => Some(s.clone()),
            TokenSource::File { path, state } => {
                let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
                let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
                if mtime.is_some() && mtime != st.0 {
                    match read_token_file(path) {
                        Ok(fresh) => {
                            tracing::info!(file = %path.display(), "Consul ACL token file changed; using the new token");
                            *st = fresh;
                        }
                        Err(e) => tracing::warn!("{e}; keeping the previous token"),
                    }
                }
                Some(st.1.clone())
            }
        }
    }

    /// After a refusal, forget the file's time so the next request reads it again.
    fn refresh(&self) {
        if let TokenSource::File { state, .. } = self {
            state.lock().unwrap_or_else(|e| e.into_inner()).0 = None;
        }
    }
}

pub(crate) fn read_token_file(path: &Path) -> Result<(Option<SystemTime>, Secret), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read the Consul ACL token file {}: {e}", path.display()))?;
    let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("the Consul ACL token file {} is empty", path.display()));
    }
    Ok((mtime, Secret::new(token)))
}

// ----- TLS ---------------------------------------------------------------------------------

fn tls_connector(opts: &TlsOptions) -> Result<TlsConnector, Error> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let cfg_err = |m: String| Error::Config(m);
    let mut roots = rustls::RootCertStore::empty();
    match &opts.ca_file {
        Some(p) => {
            let certs = CertificateDer::pem_file_iter(p).map_err(|e| cfg_err(format!("cannot read the CA file {}: {e}", p.display())))?;
            for c in certs {
                let c = c.map_err(|e| cfg_err(format!("bad certificate in the CA file {}: {e}", p.display())))?;
                roots.add(c).map_err(|e| cfg_err(format!("unusable CA certificate in {}: {e}", p.display())))?;
            }
            if roots.is_empty() {
                return Err(cfg_err(format!("the CA file {} holds no certificate", p.display())));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                let _ = roots.add(c);
            }
            if roots.is_empty() {
                return Err(cfg_err("no CA file given and no system CA certificates found; set ca_file".into()));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| cfg_err(format!("TLS setup: {e}")))?
        .with_root_certificates(roots);
    let mut config = match (&opts.cert_file, &opts.key_file) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| cfg_err(format!("cannot read the client certificate {}: {e}", cert.display())))?;
            if chain.is_empty() {
                return Err(cfg_err(format!("the client certificate file {} holds no certificate", cert.display())));
            }
            let key =
                PrivateKeyDer::from_pem_file(key).map_err(|e| cfg_err(format!("cannot read the client key {}: {e}", key.display())))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| cfg_err(format!("client certificate and key do not fit: {e}")))?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

fn server_name(address: &ConsulAddr, tls: Option<&TlsOptions>) -> Result<rustls_pki_types::ServerName<'static>, Error> {
    use rustls_pki_types::ServerName;
    if let Some(name) = tls.and_then(|t| t.server_name.as_deref()) {
        return ServerName::try_from(name.to_string()).map_err(|e| Error::Config(format!("TLS server name `{name}`: {e}")));
    }
    match &address.host {
        Host::Ip(ip) => Ok(ServerName::IpAddress((*ip).into())),
        Host::Name(n) => ServerName::try_from(n.clone()).map_err(|e| Error::Config(format!("TLS server name `{n}`: {e}"))),
    }
}

// ----- one HTTP/1.1 exchange, driven in the caller's future ----------------------------------

trait IoStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> IoStream for T {}

type Io = TokioIo<RecordErrors<Box<dyn IoStream>>>;

struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
    driver: Driver,
    idle_since: Instant,
    /// What the socket wrapper saw (shared with it).
    shared: Arc<IoShared>,
    /// Its place under `max_connections`, given back when the connection is dropped.
    slot: Option<OwnedSemaphorePermit>,
}

type Driver = Pin<Box<http1::Connection<Io, Full<Bytes>>>>;

/// A connection's driver as the caller's future polls it beside the request: whether it has
/// ended, and why (more telling than the request's "canceled", e.g. a TLS alert from a server
/// that wants a client certificate). One for [`send`], the etcd streams' head and body reads.
#[derive(Default)]
struct Driving {
    done: bool,
    err: Option<String>,
}

impl Driving {
    /// Polls `driver` unless it has ended; true when it ends in this poll (the caller then
    /// polls its request again: the driver may just have handed over the rest of the answer).
    fn poll(&mut self, driver: &mut Driver, cx: &mut std::task::Context<'_>) -> bool {
        if self.done {
            return false;
        }
        let Poll::Ready(r) = driver.as_mut().poll(cx) else { return false };
        self.done = true;
        if let Err(e) = r {
            tracing::debug!("connection closed: {e}");
            self.err = Some(error_chain(&e));
        }
        true
    }

    /// Why the connection ended: the driver's error, else what the socket wrapper recorded.
    fn why(&mut self, shared: &IoShared) -> Option<String> {
        self.err.take().or_else(|| shared.last_error.lock().unwrap_or_else(|p| p.into_inner()).take())
    }
}

/// Runs `exchange` (a request on the connection of `driver`) while polling the driver in the
/// same future, until `exchange` completes or `stop` gives an answer of its own (e.g. a
/// deadline). Hand-written because hyper's pooled client needs an executor to spawn
/// connection tasks on; this keeps every byte of I/O inside the caller's future.
async fn driven<T>(
    exchange: impl Future<Output = T>,
    driver: &mut Driver,
    driving: &mut Driving,
    mut stop: impl FnMut(&mut std::task::Context<'_>) -> Option<T>,
) -> T {
    let mut exchange = std::pin::pin!(exchange);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = exchange.as_mut().poll(cx) {
            return Poll::Ready(r);
        }
        if driving.poll(driver, cx) {
            return exchange.as_mut().poll(cx);
        }
        match stop(cx) {
            Some(r) => Poll::Ready(r),
            None => Poll::Pending,
        }
    })
    .await
}

/// State the socket wrapper records for [`send`].
#[derive(Default)]
struct IoShared {
    /// The last I/O error on the socket: hyper closes an idle connection on a read error
    /// without reporting it, and a TLS alert (client certificate refused) arrives that way.
    last_error: Mutex<Option<String>>,
    /// When the first byte of the current exchange's answer arrived (reset by [`send`]).
    first_read: Mutex<Option<Instant>>,
}

/// Passes I/O through and keeps the last error's text and the time of the first byte read
/// (hand-written: a few lines of delegation no crate offers in this form).
struct RecordErrors<T> {
    inner: T,
    shared: Arc<IoShared>,
}

impl<T> RecordErrors<T> {
    fn note<R>(&self, r: Poll<std::io::Result<R>>) -> Poll<std::io::Result<R>> {
        if let Poll::Ready(Err(e)) = &r {
            *self.shared.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
        }
        r
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for RecordErrors<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let mut first = self.shared.first_read.lock().unwrap_or_else(|p| p.into_inner());
            first.get_or_insert_with(Instant::now);
        }
        self.note(r)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for RecordErrors<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note(r)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.note(r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.note(r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Keepalive probes and `TCP_USER_TIMEOUT` (see [`HALF_OPEN_BOUND`]).
fn set_keepalive(tcp: &TcpStream) -> std::io::Result<()> {
    let sock = socket2::SockRef::from(tcp);
    let ka = socket2::TcpKeepalive::new().with_time(KEEPALIVE_IDLE).with_interval(KEEPALIVE_INTERVAL).with_retries(KEEPALIVE_PROBES);
    sock.set_tcp_keepalive(&ka)?;
    sock.set_tcp_user_timeout(Some(HALF_OPEN_BOUND))
}

struct RawResponse {
    status: hyper::StatusCode,
    headers: hyper::HeaderMap,
    body: Bytes,
    reusable: bool,
}

enum SendError {
    /// The request was not written: safe to retry anywhere.
    NotSent(String),
    /// It may have been written.
    Failed(String),
    /// The body is larger than the limit (declared in `Content-Length` or counted as it came).
    TooLarge,
    /// The answer began but was not complete within the transfer limit.
    Stalled,
}

/// Sends `req` on `conn` and reads the whole body, polling the connection's driver in the same
/// future ([`driven`]).
///
/// Memory: the body is never held beyond `limit` bytes: a `Content-Length` above it is refused
/// before any of the body is read, and a chunked body is counted as it arrives and dropped
/// (with its connection) as soon as it passes the limit. Time: from the first byte of the
/// answer (Consul sends nothing while a blocking query waits, then the whole answer at once),
/// the rest must arrive within `transfer`, so a connection that stalls mid-answer or trickles
/// a byte a second is closed after `transfer`, whatever the blocking query's own timeout.
async fn send(conn: &mut Conn, req: Request<Full<Bytes>>, limit: usize, transfer: Duration) -> Result<RawResponse, SendError> {
    let Conn { sender, driver, shared, .. } = conn;
    *shared.first_read.lock().unwrap_or_else(|p| p.into_inner()) = None;
    let mut driving = Driving::default();
    let mut deadline: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let exchange = async {
        std::future::poll_fn(|cx| sender.poll_ready(cx)).await.map_err(|e| SendError::NotSent(e.to_string()))?;
        let resp = sender.try_send_request(req).await.map_err(|mut e| {
            if e.take_message().is_some() {
                SendError::NotSent(e.into_error().to_string())
            } else {
                SendError::Failed(error_chain(e.error()))
            }
        })?;
        let (parts, mut body) = resp.into_parts();
        let declared =
            parts.headers.get(hyper::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(SendError::TooLarge);
        }
        let mut buf = BytesMut::with_capacity(declared.unwrap_or(0) as usize);
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| SendError::Failed(format!("reading the body: {}", error_chain(&e))))?;
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > limit {
                    return Err(SendError::TooLarge);
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok((parts, buf.freeze()))
    };
    // From the answer's first byte, the rest must come within `transfer`.
    let result = driven(exchange, driver, &mut driving, |cx| {
        if deadline.is_none() {
            if let Some(t) = *shared.first_read.lock().unwrap_or_else(|p| p.into_inner()) {
                deadline = Some(Box::pin(tokio::time::sleep_until(t + transfer)));
            }
        }
        deadline.as_mut().is_some_and(|d| d.as_mut().poll(cx).is_ready()).then_some(Err(SendError::Stalled))
    })
    .await;
    let driver_err = driving.why(shared);
    let (parts, body) = match (result, driver_err) {
        (Err(SendError::NotSent(_)), Some(why)) => return Err(SendError::NotSent(why)),
        (Err(SendError::Failed(_)), Some(why)) => return Err(SendError::Failed(why)),
        (r, _) => r?,
    };
    let keep_alive = !parts.headers.get(hyper::header::CONNECTION).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let reusable = keep_alive && !driving.done && !sender.is_closed();
    Ok(RawResponse { status: parts.status, headers: parts.headers, body, reusable })
}

fn error_chain(e: &hyper::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_get_dc_consistency_and_blocking_params() {
        let mut cfg = ConsulConfig::from_addresses("127.0.0.1:1").unwrap();
        cfg.datacenter = Some("dc2".into());
        cfg.consistency = Consistency::Stale;
        let c = Client::new(cfg).unwrap();
        let b = Some(Blocking { index: 7, wait: Duration::from_secs(900) });
        assert_eq!(c.full_path(&Method::GET, "/v1/kv/a/?recurse", b), "/v1/kv/a/?recurse&dc=dc2&stale&index=7&wait=600s");
        assert_eq!(c.full_path(&Method::PUT, "/v1/kv/a", None), "/v1/kv/a?dc=dc2");
        assert_eq!(c.full_path(&Method::GET, "/v1/agent/self", None), "/v1/agent/self");
        assert_eq!(c.full_path(&Method::GET, "/v1/internal/ui/nodes", None), "/v1/internal/ui/nodes?dc=dc2&stale");
        assert_eq!(kv_path("up/[::1]:80 x"), "/v1/kv/up/%5B::1%5D:80%20x");
    }

    #[test]
    fn messages_are_one_bounded_line() {
        assert_eq!(consul_message(b"  Permission denied\n"), "Permission denied");
        assert_eq!(consul_message(b""), "(empty body)");
        assert!(consul_message(&[b'x'; 5000]).len() < 420);
    }

    #[test]
    fn consul_index_header_is_a_u64_or_an_error() {
        let h = |v: &str| {
            let mut m = hyper::HeaderMap::new();
            m.insert("x-consul-index", HeaderValue::from_str(v).unwrap());
            consul_index(&m)
        };
        assert_eq!(consul_index(&hyper::HeaderMap::new()), Ok(None));
        assert_eq!(h("42"), Ok(Some(42)));
        assert_eq!(h(" 7 "), Ok(Some(7)));
        assert_eq!(h("18446744073709551615"), Ok(Some(u64::MAX)));
        for bad in ["abc", "-5", "18446744073709551616", "", "+5", "1.5", "0x10"] {
            assert!(h(bad).is_err(), "{bad:?} accepted");
        }
    }

    // The tests below put a raw socket on loopback in Consul's place to produce what Consul
    // never sends (a stalled or trickling answer, a body without end, a garbage index): the
    // client's protocol handling is what is tested. The same faults against real Consul behind
    // a fault proxy: tests/tests/module_consul_faults.rs.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A listener that runs `answer` on each connection after reading the request head.
    async fn raw_server<F, Fut>(answer: F) -> (Client, tokio::task::JoinHandle<()>)
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else { return };
                let mut head = Vec::new();
                let mut b = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&b[..n]),
                    }
                }
                tokio::spawn(answer(s));
            }
        });
        let mut cfg = ConsulConfig::from_addresses(&format!("127.0.0.1:{port}")).unwrap();
        cfg.request_timeout = Duration::from_millis(300);
        cfg.max_response_bytes = 1 << 20;
        (Client::new(cfg).unwrap(), task)
    }

    fn blocking() -> Option<Blocking> {
        // The overall timeout is then 300 ms + 5 s + 5 s/16: any error before that is the
        // transfer limit's doing.
        Some(Blocking { index: 1, wait: Duration::from_secs(5) })
    }

    #[tokio::test]
    async fn max_connections_bounds_open_connections_busy_or_idle() {
        use std::sync::atomic::AtomicUsize;
        // A keep-alive server answering each request after 30 ms, counting open connections.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let open = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (o, p) = (open.clone(), peak.clone());
        let _server = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else { return };
                let now = o.fetch_add(1, Ordering::SeqCst) + 1;
                p.fetch_max(now, Ordering::SeqCst);
                let o = o.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut b = [0u8; 1024];
                    loop {
                        match s.read(&mut b).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => head.extend_from_slice(&b[..n]),
                        }
                        while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                            head.drain(..end + 4);
                            tokio::time::sleep(Duration::from_millis(30)).await;
                            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nX-Consul-Index: 5\r\nContent-Length: 2\r\n\r\n[]").await;
                        }
                    }
                    o.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        let mut cfg = ConsulConfig::from_addresses(&format!("127.0.0.1:{port}")).unwrap();
        cfg.max_connections = Some(3);
        let c = Client::new(cfg).unwrap();
        let mut all = tokio::task::JoinSet::new();
        for _ in 0..24 {
            let c = c.clone();
            all.spawn(async move { c.get("/v1/kv/x", None).await.map(|r| r.index) });
        }
        while let Some(r) = all.join_next().await {
            assert_eq!(r.unwrap().unwrap(), 5);
        }
        assert!(peak.load(Ordering::SeqCst) <= 3, "{} connections were open at once", peak.load(Ordering::SeqCst));
        assert!(peak.load(Ordering::SeqCst) >= 2, "the requests did not run side by side");
        let mut unbounded = ConsulConfig::from_addresses(&format!("127.0.0.1:{port}")).unwrap();
        unbounded.max_connections = Some(0);
        assert!(Client::new(unbounded).is_err());
    }

    #[tokio::test]
    async fn a_garbage_index_is_a_decode_error_not_index_zero() {
        let (c, _t) = raw_server(|mut s| async move {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nX-Consul-Index: abc\r\nContent-Length: 2\r\n\r\n[]").await;
            tokio::time::sleep(Duration::from_secs(10)).await;
        })
        .await;
        match c.get("/v1/kv/x?recurse", blocking()).await {
            Err(Error::Decode { error, .. }) => assert!(error.to_string().contains("\"abc\" is not a Consul index"), "{error}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_body_stalled_mid_way_is_cut_by_the_transfer_limit() {
        let (c, _t) = raw_server(|mut s| async move {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nX-Consul-Index: 5\r\nContent-Length: 100\r\n\r\n[{\"Key\":").await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        })
        .await;
        let started = Instant::now();
        match c.get("/v1/kv/x?recurse", blocking()).await {
            Err(e @ Error::Stalled { .. }) => assert!(e.to_string().contains("not complete 300ms later"), "{e}"),
            other => panic!("{other:?} after {:?}", started.elapsed()),
        }
        assert!(started.elapsed() < Duration::from_secs(5), "cut after {:?}, by the blocking query's timeout", started.elapsed());
    }

    #[tokio::test]
    async fn a_trickling_answer_is_cut_by_the_transfer_limit() {
        let (c, _t) = raw_server(|mut s| async move {
            for b in b"HTTP/1.1 200 OK\r\nX-Consul-Index: 5\r\nContent-Length: 2\r\n\r\n[]" {
                if s.write_all(&[*b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(matches!(c.get("/v1/kv/x?recurse", blocking()).await, Err(Error::Stalled { .. })));
    }

    #[tokio::test]
    async fn an_endless_chunked_body_is_dropped_at_the_limit() {
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = sent.clone();
        let (c, _t) = raw_server(move |mut s| {
            let sent = counter.clone();
            async move {
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nX-Consul-Index: 5\r\nTransfer-Encoding: chunked\r\n\r\n").await;
                let chunk = [b'x'; 65536];
                let head = format!("{:x}\r\n", chunk.len());
                // Up to 300 MB, as long as the client reads.
                for _ in 0..4800 {
                    if s.write_all(head.as_bytes()).await.is_err()
                        || s.write_all(&chunk).await.is_err()
                        || s.write_all(b"\r\n").await.is_err()
                    {
                        return;
                    }
                    sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
            }
        })
        .await;
        assert!(matches!(c.get("/v1/kv/x?recurse", None).await, Err(Error::TooLarge { limit: 1048576, .. })));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let n = sent.load(Ordering::Relaxed);
        assert!(n < 32 << 20, "the server could send {n} bytes: the client kept reading past its 1 MiB limit");
    }

    #[tokio::test]
    async fn a_declared_length_above_the_limit_is_refused_unread() {
        let (c, _t) = raw_server(|mut s| async move {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nX-Consul-Index: 5\r\nContent-Length: 314572800\r\n\r\n").await;
            tokio::time::sleep(Duration::from_secs(10)).await;
        })
        .await;
        assert!(matches!(c.get("/v1/kv/x?recurse", blocking()).await, Err(Error::TooLarge { .. })));
    }

    #[tokio::test]
    async fn consul_connections_have_keepalive_and_a_user_timeout() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        set_keepalive(&s).unwrap();
        let r = socket2::SockRef::from(&s);
        assert!(r.keepalive().unwrap());
        assert_eq!(r.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(r.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(r.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
        assert_eq!(r.tcp_user_timeout().unwrap(), Some(HALF_OPEN_BOUND));
        assert_eq!(KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_PROBES, HALF_OPEN_BOUND);
    }

    #[test]
    fn debug_never_shows_the_token() {
        let cfg = ConsulConfig { token: Some(Secret::new("tok-123-secret")), ..Default::default() };
        let c = Client::new(cfg).unwrap();
        assert!(!format!("{c:?}").contains("tok-123"));
    }
}
