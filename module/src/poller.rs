//! The Consul poller: one thread in the leader worker, holding one blocking query per synced
//! upstream through `upsync-discovery`, and handing results to the worker's event loop.
//!
//! The thread never touches nginx: it owns its data (`WatchSpec`s built from the config), puts
//! [`Update`]s in a queue and pokes a socket the event loop watches. It also writes the dump
//! files (plain file I/O, kept off the event loop).
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::Notify;
use upsync_discovery::{
    fetch_once, Client, ConsulAddr, ConsulConfig, EndpointSet, HealthMode, Host, Query, RateLimit, Scheme, Secret, TlsOptions, Watch,
    WatchEvent, WatchOptions,
};

use crate::conf::{Consistency, Source, Token, UpstreamSync, Upsync, BURST};
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
    notify: Notify,
    waker: UnixStream,
}

impl Mailbox {
    pub fn new(waker: UnixStream) -> Arc<Mailbox> {
        Arc::new(Mailbox { updates: Mutex::new(Vec::new()), stop: AtomicBool::new(false), notify: Notify::new(), waker })
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
        // A stored permit: the thread sees it even if it is not waiting yet.
        self.mailbox.notify.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(specs: Vec<WatchSpec>, mailbox: Arc<Mailbox>) {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the poller's runtime: {e}");
            return;
        }
    };
    rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for spec in specs {
            tasks.spawn(watch_upstream(spec, mailbox.clone()));
        }
        if !mailbox.stopping() {
            mailbox.notify.notified().await;
        }
        // Dropping the watches closes their connections at once.
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    });
}

/// The discovery client configuration of one upstream.
pub fn consul_config(sync: &UpstreamSync) -> Result<ConsulConfig, String> {
    let u = sync.upsync.as_ref().ok_or("no upsync line")?;
    let https_by_tls = sync.tls.is_some();
    let addresses = u
        .addresses
        .iter()
        .map(|a| {
            Ok(ConsulAddr {
                scheme: if a.https || https_by_tls { Scheme::Https } else { Scheme::Http },
                host: Host::parse(&a.host).map_err(|e| format!("Consul address {a}: {e}"))?,
                port: a.port,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let (token, token_file) = match &sync.token {
        Some(Token::Value(v)) => (Some(Secret::new(v.clone())), None),
        Some(Token::File(p)) => (None, Some(p.clone())),
        None => (None, None),
    };
    let tls = sync.tls.as_ref().map(|t| TlsOptions {
        ca_file: t.ca_file.clone(),
        cert_file: t.cert_file.clone(),
        key_file: t.key_file.clone(),
        server_name: None,
    });
    let cfg = ConsulConfig {
        addresses,
        token,
        token_file,
        tls,
        datacenter: u.datacenter.clone(),
        consistency: match u.consistency {
            Consistency::Default => upsync_discovery::Consistency::Default,
            Consistency::Stale => upsync_discovery::Consistency::Stale,
            Consistency::Consistent => upsync_discovery::Consistency::Consistent,
        },
        // upsync max_body= (consul-faults branch): the body limit of every Consul answer.
        max_response_bytes: u.max_body,
        ..ConsulConfig::default()
    };
    cfg.validate().map_err(|e| e.to_string())?;
    Ok(cfg)
}

/// The discovery query of one upstream.
pub fn query(source: &Source) -> Query {
    match source {
        Source::Kv { prefix } => Query::Kv { prefix: prefix.clone() },
        Source::CatalogService { name } => Query::CatalogService { name: name.clone(), tag: None },
        Source::HealthService { name, omit_unhealthy } => Query::HealthService {
            name: name.clone(),
            tag: None,
            mode: if *omit_unhealthy { HealthMode::Omit } else { HealthMode::MarkDown },
        },
    }
}

/// Blocking-query settings from `upsync_timeout` and `upsync_interval`: the `wait` leaves room
/// for Consul's wait/16 jitter and the transfer inside `upsync_timeout`; the token bucket lets
/// `BURST` polls go back to back and then one per `upsync_interval`.
pub fn watch_options(u: &Upsync) -> WatchOptions {
    let wait = (u.timeout * 15 / 17).clamp(Duration::from_secs(1), Duration::from_secs(600));
    WatchOptions {
        wait,
        rate: RateLimit { burst: BURST, per_second: 1.0 / u.interval.as_secs_f64().max(0.001) },
        ..WatchOptions::default()
    }
}

async fn watch_upstream(spec: WatchSpec, mailbox: Arc<Mailbox>) {
    let WatchSpec { id, upstream, sync, known } = spec;
    let fail = |message: String| {
        tracing::error!("upstream \"{upstream}\": {message}; keeping the current servers");
        mailbox.push(Update::Error { id, message, index: 0 });
    };
    let Some(u) = sync.upsync.as_ref() else { return };
    let client = match consul_config(&sync).and_then(|c| Client::new(c).map_err(|e| e.to_string())) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let mut watch = Watch::new(client, query(&u.source), watch_options(u));
    let mut last = known;
    let mut dumped = false;
    loop {
        match watch.next().await {
            WatchEvent::Changed { value, index, skipped } => {
                for s in &skipped {
                    tracing::warn!("upstream \"{upstream}\": skipped Consul entry \"{}\" at index {index}: {}", s.key, s.reason);
                }
                let Some(set) = value.into_endpoints() else { continue };
                let mut servers = to_servers(&upstream, &set, index).await;
                keep_skipped(&mut servers, last.as_deref(), &skipped);
                if servers.is_empty() && !sync.allow_empty {
                    let message = format!(
                        "Consul returned no servers at index {index}; keeping the last {} (upsync_allow_empty on lets an upstream become empty)",
                        last.as_ref().map(Vec::len).unwrap_or(0)
                    );
                    tracing::warn!("upstream \"{upstream}\": {message}");
                    mailbox.push(Update::Error { id, message, index });
                    continue;
                }
                if last.as_ref() == Some(&servers) {
                    mailbox.push(Update::Synced { id, index });
                } else {
                    mailbox.push(Update::Servers { id, servers: servers.clone(), index });
                }
                if last.as_ref() != Some(&servers) || !dumped {
                    if let Some(path) = &sync.dump_path {
                        match crate::dump::write_atomic(path, &servers) {
                            Ok(()) => dumped = true,
                            Err(e) => tracing::error!(
                                "upstream \"{upstream}\": cannot write the dump file {}: {e} (check the directory exists and is writable by nginx's worker user)",
                                path.display()
                            ),
                        }
                    }
                }
                last = Some(servers);
            }
            WatchEvent::Error { error, index, attempt, retry_in } => {
                let message = error.to_string();
                tracing::error!(
                    "upstream \"{upstream}\": {message} (Consul index {index}, attempt {attempt}, next try in {} ms); keeping the current servers",
                    retry_in.as_millis()
                );
                mailbox.push(Update::Error { id, message, index });
            }
        }
    }
}

/// A malformed entry for a server that is already in the list keeps that server as it was
/// (the last good state), instead of dropping it: the registry data is bad, not the server.
pub fn keep_skipped(servers: &mut Vec<Server>, last: Option<&[Server]>, skipped: &[upsync_discovery::Skipped]) {
    let Some(last) = last else { return };
    for s in skipped {
        let tail = s.key.rsplit('/').next().unwrap_or("");
        let Ok(addr) = tail.parse::<SocketAddr>() else { continue };
        if servers.iter().any(|x| x.addr == addr) {
            continue;
        }
        if let Some(old) = last.iter().find(|x| x.addr == addr) {
            servers.push(old.clone());
        }
    }
}

/// Endpoints as nginx servers: IP endpoints as they are, hostnames resolved (every address
/// becomes a server with the same attributes; a name that does not resolve is skipped).
async fn to_servers(upstream: &str, set: &EndpointSet, index: u64) -> Vec<Server> {
    let mut out: Vec<Server> = Vec::with_capacity(set.len());
    for e in set.iter() {
        let make = |addr: SocketAddr| Server {
            addr,
            weight: e.weight.max(1),
            max_fails: e.max_fails,
            fail_timeout: e.fail_timeout,
            down: e.down,
            backup: e.backup,
        };
        match &e.host {
            Host::Ip(ip) => out.push(make(SocketAddr::new(*ip, e.port))),
            Host::Name(name) => match tokio::net::lookup_host((name.as_str(), e.port)).await {
                Ok(addrs) => {
                    let mut addrs: Vec<SocketAddr> = addrs.collect();
                    addrs.sort();
                    addrs.dedup();
                    for a in addrs {
                        if !out.iter().any(|s| s.addr == a) {
                            out.push(make(a));
                        }
                    }
                }
                Err(err) => {
                    tracing::warn!("upstream \"{upstream}\": skipped {} at Consul index {index}: cannot resolve {name}: {err}", e.addr())
                }
            },
        }
    }
    out
}

/// A blocking read of one upstream's servers at start-up (`strong_dependency=on`): `attempts`
/// tries with a short pause, each bounded by the client's timeouts. Runs on the calling thread
/// with a short-lived current-thread runtime; nothing outlives the call (no thread, no socket).
pub fn fetch_initial(upstream: &str, sync: &UpstreamSync, attempts: u32) -> Result<(Vec<Server>, u64), String> {
    let u = sync.upsync.as_ref().ok_or("no upsync line")?;
    let cfg = consul_config(sync)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| format!("cannot start a runtime: {e}"))?;
    let result = rt.block_on(async {
        let client = Client::new(cfg).map_err(|e| e.to_string())?;
        let q = query(&u.source);
        let mut last_err = String::new();
        for attempt in 1..=attempts.max(1) {
            match fetch_once(&client, &q).await {
                Ok(f) => {
                    for s in &f.skipped {
                        tracing::warn!("upstream \"{upstream}\": skipped Consul entry \"{}\": {}", s.key, s.reason);
                    }
                    let set = f.value.into_endpoints().unwrap_or_default();
                    let servers = to_servers(upstream, &set, f.index).await;
                    if servers.is_empty() && !sync.allow_empty {
                        return Err(format!("Consul has no servers for it (index {})", f.index));
                    }
                    return Ok((servers, f.index));
                }
                Err(e) => {
                    last_err = format!("{e} (attempt {attempt} of {attempts})");
                    if e.is_acl_denied() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(300 * attempt as u64)).await;
                }
            }
        }
        Err(last_err)
    });
    // Dropping the runtime here joins any blocking-pool thread (hostname resolution) it started.
    drop(rt);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conf::parse_upsync;

    fn srv(a: &str, w: u32) -> Server {
        Server { addr: a.parse().unwrap(), weight: w, max_fails: 2, fail_timeout: 10, down: false, backup: false }
    }

    #[test]
    fn malformed_entries_keep_known_servers() {
        let last = vec![srv("10.0.0.1:80", 5), srv("10.0.0.2:80", 1)];
        let mut now = vec![srv("10.0.0.2:80", 1)];
        let skipped = vec![
            upsync_discovery::Skipped { key: "upstreams/app/10.0.0.1:80".into(), reason: "bad JSON".into() },
            upsync_discovery::Skipped { key: "upstreams/app/10.0.0.9:80".into(), reason: "bad JSON".into() },
            upsync_discovery::Skipped { key: "upstreams/app/garbage".into(), reason: "not IP:PORT".into() },
        ];
        keep_skipped(&mut now, Some(&last), &skipped);
        assert_eq!(now, vec![srv("10.0.0.2:80", 1), srv("10.0.0.1:80", 5)]);
    }

    #[test]
    fn config_maps_to_discovery() {
        let mut sync = UpstreamSync {
            upsync: Some(
                parse_upsync(&[
                    "10.0.0.1:8500,[::1]:8501/v1/health/service/web",
                    "upsync_type=consul_health",
                    "health=omit",
                    "dc=dc2",
                    "stale",
                ])
                .unwrap(),
            ),
            token: Some(Token::Value("t0k3n".into())),
            ..Default::default()
        };
        let cfg = consul_config(&sync).unwrap();
        assert_eq!(cfg.addresses.len(), 2);
        assert!(cfg.addresses.iter().all(|a| a.scheme == Scheme::Http));
        assert_eq!(cfg.datacenter.as_deref(), Some("dc2"));
        assert_eq!(cfg.consistency, upsync_discovery::Consistency::Stale);
        assert_eq!(cfg.token.as_ref().map(|t| t.expose()), Some("t0k3n"));
        assert!(!format!("{cfg:?}").contains("t0k3n"), "the token leaks through Debug");
        assert_eq!(
            query(&sync.upsync.as_ref().unwrap().source),
            Query::HealthService { name: "web".into(), tag: None, mode: HealthMode::Omit }
        );
        sync.tls = Some(crate::conf::Tls::default());
        assert!(consul_config(&sync).unwrap().addresses.iter().all(|a| a.scheme == Scheme::Https));
    }

    #[test]
    fn watch_options_fit_inside_upsync_timeout() {
        let u = parse_upsync(&["127.0.0.1:8500/v1/kv/x", "upsync_timeout=6m", "upsync_interval=500ms"]).unwrap();
        let o = watch_options(&u);
        // Consul may hold a query for wait + wait/16; the client adds its request timeout (10 s).
        assert!(o.wait + o.wait / 16 + Duration::from_secs(10) <= u.timeout, "{:?}", o.wait);
        assert_eq!(o.rate.burst, BURST);
        assert!((o.rate.per_second - 2.0).abs() < 1e-9);
        let long = parse_upsync(&["127.0.0.1:8500/v1/kv/x", "upsync_timeout=1h"]).unwrap();
        assert_eq!(watch_options(&long).wait, Duration::from_secs(600));
    }
}
