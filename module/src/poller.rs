//! The Consul poller: a process of its own, forked by the leader worker, holding one blocking
//! query per synced upstream through `upsync-discovery` and reporting results to that worker
//! over a socket ([`crate::link`]).
//!
//! Why a process and not a thread of the worker: once a process has a second thread, glibc
//! takes its multi-threaded path for good (locked malloc, cancellable system calls), which cost
//! the leader worker ~1% more instructions on every request (`make bench`, callgrind). In a
//! process of its own, the poller leaves every nginx worker single-threaded.
//!
//! The process never touches nginx: it owns its data (`WatchSpec`s built from the config before
//! the fork) and sends [`Report`]s. Everything that can take time is done here, off the event
//! loop: hostname resolution (bounded by [`RESOLVE_TIMEOUT`]), encoding lists for the shared
//! zone, summarising changes, and writing the dump files (once the worker says a list is
//! installed, so the dump always matches what the workers serve).
//!
//! Supervision: a watch whose client cannot be built (unreadable CA file, bad token file) retries
//! with capped backoff and resumes by itself once the cause is fixed; a watch task that panics is
//! logged, reported to `upstream_show` and restarted.
//!
//! Stopping never waits: the worker closes its end of the socket and goes on; the poller sees
//! the socket close, drops its tasks and its runtime without waiting for blocking work still
//! running (a resolver that never answers), and exits.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use upsync_discovery::decode::{service_endpoints, KvStamp};
use upsync_discovery::{
    fetch_once, Client, ConsulAddr, ConsulConfig, EndpointSet, HealthMode, Host, Query, RateLimit, Scheme, Secret, TlsOptions, Watch,
    WatchEvent, WatchOptions, WatchValue,
};

use crate::conf::{Consistency, Source, Token, UpstreamSync, Upsync, BURST};
use crate::link::{self, Command, Report};
use crate::model::{describe_change, encode_servers, listing_order, AddrMap, AddrSet, Server};
use crate::plan::{self, Group, Unit, UnitKind};

/// How long one hostname (a `HOST:PORT` key) may take to resolve before it is skipped for this
/// answer (glibc's resolver can wait 30 s and more for a server that never answers).
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Backoff of a watch that cannot start (its client cannot be built): first wait and cap.
const START_RETRY_FIRST: Duration = Duration::from_millis(500);
const START_RETRY_MAX: Duration = Duration::from_secs(10);
/// Pause before a watch task that panicked is started again.
const RESTART_DELAY: Duration = Duration::from_secs(1);

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
    /// A new list (different from the last one this watch sent) at Consul index `index`, with
    /// its encoded form for the shared zone and a summary of the change (`+1 -0 ~0`), both
    /// prepared on the poller thread.
    Servers { id: usize, servers: Vec<Server>, encoded: Vec<u8>, summary: String, index: u64 },
    /// Consul answered; the list did not change.
    Synced { id: usize, index: u64 },
    /// Something went wrong; the list being served stays. `watch_ok`: the watch itself works
    /// (the answer was refused, e.g. empty) as opposed to failing to reach or query Consul.
    Error { id: usize, message: String, index: u64, watch_ok: bool },
    /// The watch task panicked and is restarted.
    Restarted { id: usize, message: String },
}

/// A dump file to write: the list the workers now serve.
#[derive(Clone, Debug)]
pub struct DumpRequest {
    pub upstream: String,
    pub path: PathBuf,
    pub servers: Arc<Vec<Server>>,
}

/// Between the poller's watches and whoever forwards their results: in the poller process,
/// the link to the worker ([`run_process`]); in tests, the test itself.
pub struct Mailbox {
    updates: Mutex<Vec<Update>>,
    dumps: Mutex<Vec<DumpRequest>>,
    dump_wanted: Notify,
    stop: AtomicBool,
    notify: Notify,
    /// Something is waiting to be forwarded (an update, or a log line: see [`Mailbox::wake`]).
    out_ready: Notify,
}

impl Mailbox {
    pub fn new() -> Arc<Mailbox> {
        Arc::new(Mailbox {
            updates: Mutex::new(Vec::new()),
            dumps: Mutex::new(Vec::new()),
            dump_wanted: Notify::new(),
            stop: AtomicBool::new(false),
            notify: Notify::new(),
            out_ready: Notify::new(),
        })
    }

    pub fn push(&self, u: Update) {
        self.updates.lock().unwrap_or_else(|e| e.into_inner()).push(u);
        self.wake();
    }

    /// Wakes the forwarder (the log layer calls this after queueing a line). A stored permit:
    /// a wake-up while the forwarder is busy is not lost.
    pub fn wake(&self) {
        self.out_ready.notify_one();
    }

    pub fn take(&self) -> Vec<Update> {
        std::mem::take(&mut *self.updates.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Asks for a dump file to be written (once the worker says the list is served). Only the
    /// newest request per file is kept.
    pub fn request_dump(&self, request: DumpRequest) {
        let mut q = self.dumps.lock().unwrap_or_else(|e| e.into_inner());
        q.retain(|r| r.path != request.path);
        q.push(request);
        drop(q);
        self.dump_wanted.notify_one();
    }

    fn take_dumps(&self) -> Vec<DumpRequest> {
        std::mem::take(&mut *self.dumps.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Tells the supervisor to stop its watches; returns at once.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        // A stored permit: the supervisor sees it even if it is not waiting yet.
        self.notify.notify_one();
    }
}

/// A watch task as the supervisor starts it (a function so tests can supervise other tasks).
pub type TaskFn = fn(Arc<GroupClient>, Unit, Arc<Mailbox>) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The Consul client of a [`plan::Group`], built once by the first of its watches that needs
/// it (building reads files, retried until it works: see [`start_client`]).
pub struct GroupClient {
    sync: UpstreamSync,
    connections: usize,
    client: tokio::sync::OnceCell<Client>,
}

impl GroupClient {
    pub fn new(sync: UpstreamSync, connections: usize) -> GroupClient {
        GroupClient { sync, connections, client: tokio::sync::OnceCell::new() }
    }

    async fn get(&self, unit: &Unit, mailbox: &Mailbox) -> Client {
        self.client.get_or_init(|| start_client(unit, &self.sync, self.connections, mailbox)).await.clone()
    }
}

/// What a unit's log lines call it: its upstream, or its query and how many it serves.
pub fn unit_label(unit: &Unit) -> String {
    match &unit.kind {
        UnitKind::Single => format!("upstream \"{}\"", unit.members.first().map(|m| m.upstream.as_str()).unwrap_or("")),
        UnitKind::KvTree { root } => format!("KV folder \"{root}\" ({} upstreams)", unit.members.len()),
        UnitKind::Catalog => format!("node dump ({} catalog/health upstreams)", unit.members.len()),
    }
}

/// The poller's watches as one list of (client, unit), logging what they are.
fn units_of(groups: Vec<Group>, connections: usize) -> Vec<(Arc<GroupClient>, Unit)> {
    let upstreams: usize = groups.iter().flat_map(|g| &g.units).map(|u| u.members.len()).sum();
    let queries: usize = groups.iter().map(|g| g.units.len()).sum();
    tracing::info!(
        "watching {upstreams} upstream(s) with {queries} Consul blocking quer{} through {} client(s) of at most {connections} connection(s) each",
        if queries == 1 { "y" } else { "ies" },
        groups.len()
    );
    groups
        .into_iter()
        .flat_map(|g| {
            let client = Arc::new(GroupClient::new(g.sync, connections));
            g.units.into_iter().map(move |u| (client.clone(), u))
        })
        .collect()
}

fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => Some(rt),
        Err(e) => {
            tracing::error!("cannot start the poller's runtime: {e}");
            None
        }
    }
}

/// The watches alone, with `task` for each unit, until the mailbox says stop (tests drive the
/// supervisor through this; the module runs [`run_process`]).
#[cfg(test)]
fn run(groups: Vec<Group>, connections: usize, mailbox: Arc<Mailbox>, task: TaskFn) {
    let Some(rt) = runtime() else { return };
    rt.block_on(supervise(units_of(groups, connections), mailbox, task));
    // Do not wait for blocking work still running (a hostname lookup that never returns).
    rt.shutdown_background();
}

/// The poller process's body: one supervised task per query of the plan, the dump writer, and
/// the two directions of the link to the worker that forked it, until the link closes (the
/// worker stopped leading or exited). `take_logs` hands over the log lines this process queued
/// (its log layer queues every line and wakes `mailbox`).
pub fn run_process(
    specs: Vec<WatchSpec>,
    connections: usize,
    mailbox: Arc<Mailbox>,
    link: UnixStream,
    take_logs: fn() -> Vec<(usize, String)>,
) {
    let book = Arc::new(Mutex::new(DumpBook::new(&specs)));
    // A list from Consul that no leader dumped yet (the first list of a strong_dependency=on
    // upstream is read by the master): dump it once.
    for spec in &specs {
        if let (Some(path), Some(known)) = (&spec.sync.dump_path, &spec.known) {
            mailbox.request_dump(DumpRequest { upstream: spec.upstream.clone(), path: path.clone(), servers: Arc::new(known.clone()) });
        }
    }
    let units = units_of(plan::plan(specs, connections), connections);
    let Some(rt) = runtime() else { return };
    rt.block_on(async {
        let link = match link.set_nonblocking(true).and_then(|()| tokio::net::UnixStream::from_std(link)) {
            Ok(l) => Arc::new(l),
            Err(e) => {
                tracing::error!("cannot use the socket to the worker: {e}");
                return;
            }
        };
        let forward = tokio::spawn(forward(mailbox.clone(), link.clone(), book.clone(), take_logs));
        let commands = tokio::spawn(commands(mailbox.clone(), link, book));
        supervise(units, mailbox, |client, unit, mb| Box::pin(watch_unit(client, unit, mb))).await;
        forward.abort();
        commands.abort();
    });
    rt.shutdown_background();
}

/// What the poller process remembers for the dump files: per upstream, the lists it sent and
/// the worker has not answered yet, so that a dump always holds a list the workers served.
#[derive(Debug, Default)]
pub struct DumpBook {
    entries: HashMap<usize, BookEntry>,
    seq: u64,
}

#[derive(Debug)]
struct BookEntry {
    upstream: String,
    path: Option<PathBuf>,
    sent: std::collections::VecDeque<(u64, Arc<Vec<Server>>)>,
}

impl DumpBook {
    pub fn new(specs: &[WatchSpec]) -> DumpBook {
        let entries = specs
            .iter()
            .map(|s| (s.id, BookEntry { upstream: s.upstream.clone(), path: s.sync.dump_path.clone(), sent: Default::default() }))
            .collect();
        DumpBook { entries, seq: 0 }
    }

    /// Numbers a list sent to the worker (kept only if the upstream has a dump file).
    pub fn sent(&mut self, id: usize, servers: Vec<Server>) -> u64 {
        self.seq += 1;
        if let Some(e) = self.entries.get_mut(&id).filter(|e| e.path.is_some()) {
            e.sent.push_back((self.seq, Arc::new(servers)));
        }
        self.seq
    }

    /// The worker answered list `seq` (answers come in the order the lists were sent): the
    /// dump to write, if it asked for one.
    pub fn ack(&mut self, id: usize, seq: u64, dump: bool) -> Option<DumpRequest> {
        let e = self.entries.get_mut(&id)?;
        while e.sent.front().is_some_and(|(s, _)| *s < seq) {
            e.sent.pop_front();
        }
        let (_, servers) = e.sent.pop_front().filter(|(s, _)| *s == seq)?;
        let path = e.path.clone()?;
        dump.then(|| DumpRequest { upstream: e.upstream.clone(), path, servers })
    }
}

/// Sends the watches' results and this process's log lines to the worker, as they come.
async fn forward(
    mailbox: Arc<Mailbox>,
    link: Arc<tokio::net::UnixStream>,
    book: Arc<Mutex<DumpBook>>,
    take_logs: fn() -> Vec<(usize, String)>,
) {
    let mut out = Vec::new();
    loop {
        mailbox.out_ready.notified().await;
        out.clear();
        for (level, line) in take_logs() {
            link::frame(&Report::Log { level, line }, &mut out);
        }
        for u in mailbox.take() {
            let report = match u {
                Update::Servers { id, servers, encoded, summary, index } => {
                    let count = servers.len();
                    let seq = book.lock().unwrap_or_else(|e| e.into_inner()).sent(id, servers);
                    Report::Servers { id, seq, count, encoded, summary, index }
                }
                Update::Synced { id, index } => Report::Synced { id, index },
                Update::Error { id, message, index, watch_ok } => Report::Error { id, message, index, watch_ok },
                Update::Restarted { id, message } => Report::Restarted { id, message },
            };
            link::frame(&report, &mut out);
        }
        let mut rest = &out[..];
        while !rest.is_empty() {
            let written = match link.writable().await {
                Ok(()) => link.try_write(rest),
                Err(e) => Err(e),
            };
            match written {
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    // The worker is gone: nothing to report to.
                    mailbox.stop();
                    return;
                }
            }
        }
    }
}

/// Reads the worker's answers; stops the poller when the link closes.
async fn commands(mailbox: Arc<Mailbox>, link: Arc<tokio::net::UnixStream>, book: Arc<Mutex<DumpBook>>) {
    let mut inbox = link::Inbox::default();
    let mut buf = vec![0u8; 4096];
    'read: loop {
        let read = match link.readable().await {
            Ok(()) => link.try_read(&mut buf),
            Err(e) => Err(e),
        };
        match read {
            Ok(0) => break,
            Ok(n) => inbox.extend(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => break,
        }
        loop {
            match inbox.next_frame::<Command>() {
                Ok(Some(Command::Ack { id, seq, dump })) => {
                    if let Some(d) = book.lock().unwrap_or_else(|e| e.into_inner()).ack(id, seq, dump) {
                        mailbox.request_dump(d);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::error!("the socket from the worker is unreadable ({e}); the poller stops and the worker starts a new one");
                    break 'read;
                }
            }
        }
    }
    mailbox.stop();
}

async fn supervise(units: Vec<(Arc<GroupClient>, Unit)>, mailbox: Arc<Mailbox>, task: TaskFn) {
    let mut tasks = tokio::task::JoinSet::new();
    let mut running: HashMap<tokio::task::Id, (Arc<GroupClient>, Unit)> = HashMap::new();
    for (client, unit) in units {
        let handle = tasks.spawn(task(client.clone(), unit.clone(), mailbox.clone()));
        running.insert(handle.id(), (client, unit));
    }
    let dumps = tokio::spawn(write_dumps(mailbox.clone()));
    while !mailbox.stopping() {
        tokio::select! {
            _ = mailbox.notify.notified() => {}
            Some(done) = tasks.join_next_with_id() => {
                let (task_id, why) = match done {
                    Ok((task_id, ())) => (task_id, "ended".to_string()),
                    Err(e) => {
                        let task_id = e.id();
                        let why = if e.is_panic() { format!("panicked: {}", panic_message(e.into_panic())) } else { "was cancelled".into() };
                        (task_id, why)
                    }
                };
                let Some((client, unit)) = running.remove(&task_id) else { continue };
                let message = format!("the Consul watch {why}; restarting it in {} ms", RESTART_DELAY.as_millis());
                tracing::error!("{}: {message}", unit_label(&unit));
                for m in &unit.members {
                    mailbox.push(Update::Restarted { id: m.id, message: message.clone() });
                }
                let (again, c, mb) = (unit.clone(), client.clone(), mailbox.clone());
                let handle = tasks.spawn(async move {
                    tokio::time::sleep(RESTART_DELAY).await;
                    task(c, again, mb).await
                });
                running.insert(handle.id(), (client, unit));
            }
        }
    }
    // Dropping the watches closes their connections at once.
    tasks.abort_all();
    dumps.abort();
}

/// The message a panic carried (its `&str` or `String` payload).
pub fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_else(|| "(no message)".into())
}

/// Writes the dump files the event loop asks for, on the runtime's blocking pool (file I/O and
/// fsync never run on nginx's event loop, nor hold up the watches).
async fn write_dumps(mailbox: Arc<Mailbox>) {
    loop {
        mailbox.dump_wanted.notified().await;
        for d in mailbox.take_dumps() {
            let result = tokio::task::spawn_blocking({
                let d = d.clone();
                move || crate::dump::write_atomic(&d.path, &d.servers)
            })
            .await;
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(
                    "upstream \"{}\": cannot write the dump file {}: {e} (check the directory exists and is writable by nginx's worker user)",
                    d.upstream,
                    d.path.display()
                ),
                Err(e) => tracing::error!("upstream \"{}\": writing the dump file {} failed: {e}", d.upstream, d.path.display()),
            }
        }
    }
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
        // Not a Consul query: the discovery Watch runs etcd's own watch for it.
        Source::Etcd { api, prefix } => Query::Etcd { api: *api, prefix: prefix.clone() },
    }
}

/// The registry an upstream's messages name.
fn registry(sync: &UpstreamSync) -> &'static str {
    match sync.upsync.as_ref().map(|u| &u.source) {
        Some(Source::Etcd { .. }) => "etcd",
        _ => "Consul",
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

/// The `wait` of a watch grows from this with the watch's age (see
/// [`WatchOptions::ramp_from`]): a leader replaced soon after it started (reloads in a row)
/// leaves behind blocking queries that Consul stops counting within seconds, not minutes.
pub const RAMP_FROM: Duration = Duration::from_secs(2);

/// The watch settings of a unit: those of its most demanding member (shortest timeout and
/// interval), with the wait ramped up from [`RAMP_FROM`].
pub fn unit_options(unit: &Unit) -> WatchOptions {
    let mut opts: Option<WatchOptions> = None;
    for m in &unit.members {
        let Some(u) = m.sync.upsync.as_ref() else { continue };
        let o = watch_options(u);
        opts = Some(match opts {
            None => o,
            Some(p) => WatchOptions {
                wait: p.wait.min(o.wait),
                rate: RateLimit { burst: p.rate.burst, per_second: p.rate.per_second.max(o.rate.per_second) },
                ..p
            },
        });
    }
    WatchOptions { ramp_from: Some(RAMP_FROM), ..opts.unwrap_or_default() }
}

/// One upstream inside a watch: what it serves now and how its source looked last.
struct Member {
    id: usize,
    upstream: String,
    sync: UpstreamSync,
    last: Option<Vec<Server>>,
    /// The KV stamp of its prefix at the last tree read (KV folders only).
    stamp: Option<KvStamp>,
    /// Report the next result even if the list did not change (first result, after errors).
    report: bool,
    unresolvable: Unresolvable,
}

impl Member {
    fn new(spec: WatchSpec) -> Member {
        Member {
            id: spec.id,
            upstream: spec.upstream,
            sync: spec.sync,
            last: spec.known,
            stamp: None,
            report: true,
            unresolvable: Unresolvable::default(),
        }
    }

    fn source(&self) -> Option<&Source> {
        self.sync.upsync.as_ref().map(|u| &u.source)
    }

    /// A new endpoint set from Consul for this upstream: refused if empty (unless allowed),
    /// else sent to the event loop if it differs from what is served.
    async fn on_set(&mut self, set: &EndpointSet, skipped: &[upsync_discovery::Skipped], index: u64, mailbox: &Mailbox) {
        let (id, upstream, registry) = (self.id, self.upstream.as_str(), registry(&self.sync));
        for s in skipped {
            tracing::warn!("upstream \"{upstream}\": skipped {registry} entry \"{}\" at index {index}: {}", s.key, s.reason);
        }
        let mut servers = to_servers(upstream, set, index, &mut self.unresolvable).await;
        keep_skipped(&mut servers, self.last.as_deref(), skipped);
        let servers = listing_order(self.last.as_deref(), servers);
        if servers.is_empty() && !self.sync.allow_empty {
            let message = format!(
                "{registry} returned no servers at index {index}; keeping the last {} (upsync_allow_empty on lets an upstream become empty)",
                self.last.as_ref().map(Vec::len).unwrap_or(0)
            );
            tracing::warn!("upstream \"{upstream}\": {message}");
            mailbox.push(Update::Error { id, message, index, watch_ok: true });
            self.report = true;
            return;
        }
        if self.last.as_ref() == Some(&servers) {
            if std::mem::take(&mut self.report) {
                mailbox.push(Update::Synced { id, index });
            }
        } else {
            let summary = describe_change(self.last.as_deref().unwrap_or(&[]), &servers);
            let encoded = encode_servers(&servers);
            mailbox.push(Update::Servers { id, servers: servers.clone(), encoded, summary, index });
            self.report = false;
        }
        self.last = Some(servers);
    }
}

/// One blocking query of the plan and the upstreams it serves, until the poller stops.
async fn watch_unit(group: Arc<GroupClient>, unit: Unit, mailbox: Arc<Mailbox>) {
    let label = unit_label(&unit);
    let client = group.get(&unit, &mailbox).await;
    let opts = unit_options(&unit);
    let mut members: Vec<Member> = unit.members.into_iter().map(Member::new).collect();
    let q = match &unit.kind {
        UnitKind::Single => match members.first().and_then(Member::source) {
            Some(source) => query(source),
            None => return,
        },
        UnitKind::KvTree { root } => Query::KvTree { root: root.clone() },
        UnitKind::Catalog => Query::NodeDump,
    };
    let mut watch = Watch::new(client, q, opts);
    loop {
        match watch.next().await {
            WatchEvent::Changed { value, index, skipped } => match value {
                WatchValue::Endpoints(set) => {
                    if let Some(m) = members.first_mut() {
                        m.on_set(&set, &skipped, index, &mailbox).await;
                    }
                }
                WatchValue::KvTree(tree) => {
                    let mut changed = 0usize;
                    for m in &mut members {
                        let Some(Source::Kv { prefix }) = m.source() else { continue };
                        let stamp = tree.stamp(prefix);
                        if m.stamp == Some(stamp) {
                            // Nothing under its prefix changed since it was last decoded: no
                            // decoding, nothing sent.
                            continue;
                        }
                        let d = tree.endpoints(prefix);
                        m.stamp = Some(stamp);
                        changed += 1;
                        m.on_set(&d.value, &d.skipped, index, &mailbox).await;
                    }
                    tracing::debug!("{label}: {} keys at index {index}, {changed} prefix(es) changed", tree.len());
                }
                WatchValue::Instances(all) => {
                    let mut by_service: HashMap<&str, Vec<&upsync_discovery::Endpoint>> = HashMap::new();
                    for e in all.iter() {
                        if let Some(name) = e.service.as_deref() {
                            by_service.entry(name).or_default().push(e);
                        }
                    }
                    if !skipped.is_empty() {
                        tracing::debug!("{label}: {} instance(s) of the node dump skipped at index {index}", skipped.len());
                    }
                    for m in &mut members {
                        let (name, mode) = match m.source() {
                            Some(Source::CatalogService { name }) => (name.clone(), None),
                            Some(Source::HealthService { name, omit_unhealthy }) => {
                                (name.clone(), Some(if *omit_unhealthy { HealthMode::Omit } else { HealthMode::MarkDown }))
                            }
                            _ => continue,
                        };
                        let instances = by_service.get(name.as_str()).map(|v| v.as_slice()).unwrap_or(&[]);
                        let d = service_endpoints(instances.iter().copied(), mode);
                        m.on_set(&d.value, &d.skipped, index, &mailbox).await;
                    }
                }
                other => tracing::error!("{label}: unexpected answer {other:?}"),
            },
            WatchEvent::Error { error, index, attempt, retry_in } => {
                let message = error.to_string();
                tracing::error!(
                    "{label}: {message} ({} index {index}, attempt {attempt}, next try in {} ms); keeping the current servers",
                    registry(&group.sync),
                    retry_in.as_millis()
                );
                for m in &mut members {
                    // The next answer is decoded and reported for every upstream.
                    m.report = true;
                    m.stamp = None;
                    mailbox.push(Update::Error { id: m.id, message: message.clone(), index, watch_ok: false });
                }
            }
        }
    }
}

/// The group's Consul client. Building it reads files (CA, client certificate); while that
/// fails (a file being rotated, unreadable) the error is reported to every upstream of `unit`
/// and the build retried with capped exponential backoff, so the watches resume by
/// themselves once the cause is fixed.
async fn start_client(unit: &Unit, sync: &UpstreamSync, connections: usize, mailbox: &Mailbox) -> Client {
    let label = unit_label(unit);
    let mut wait = START_RETRY_FIRST;
    let mut attempt = 1u32;
    loop {
        let built = consul_config(sync).and_then(|mut c| {
            c.max_connections = Some(connections.max(plan::MIN_CONNECTIONS));
            Client::new(c).map_err(|e| e.to_string())
        });
        match built {
            Ok(c) => {
                if attempt > 1 {
                    tracing::info!("{label}: the Consul client started after {attempt} attempts");
                }
                return c;
            }
            Err(e) => {
                let message = format!("cannot start the Consul watch: {e} (attempt {attempt}, next try in {} ms)", wait.as_millis());
                tracing::error!("{label}: {message}; keeping the current servers");
                for m in &unit.members {
                    mailbox.push(Update::Error { id: m.id, message: message.clone(), index: 0, watch_ok: false });
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(START_RETRY_MAX);
                attempt += 1;
            }
        }
    }
}

/// A malformed entry for a server that is already in the list keeps that server as it was
/// (the last good state), instead of dropping it: the registry data is bad, not the server.
pub fn keep_skipped(servers: &mut Vec<Server>, last: Option<&[Server]>, skipped: &[upsync_discovery::Skipped]) {
    let Some(last) = last else { return };
    if skipped.is_empty() {
        return;
    }
    let mut present: AddrSet = servers.iter().map(|s| s.addr).collect();
    let before: AddrMap<&Server> = last.iter().map(|s| (s.addr, s)).collect();
    for s in skipped {
        let tail = s.key.rsplit('/').next().unwrap_or("");
        let Ok(addr) = tail.parse::<SocketAddr>() else { continue };
        if let Some(old) = before.get(&addr) {
            if present.insert(addr) {
                servers.push((*old).clone());
            }
        }
    }
}

/// Endpoints as nginx servers: IP endpoints as they are, hostnames resolved (every address
/// becomes a server with the same attributes; a name that does not resolve is skipped).
/// Names whose resolution timed out, skipped without asking the resolver again until
/// [`UNRESOLVABLE_FOR`] has passed: a resolver that never answers costs one
/// [`RESOLVE_TIMEOUT`] per name and period, not one per Consul answer.
#[derive(Default)]
pub struct Unresolvable(HashMap<String, tokio::time::Instant>);

/// How long a name that timed out is skipped.
pub const UNRESOLVABLE_FOR: Duration = Duration::from_secs(30);

async fn to_servers(upstream: &str, set: &EndpointSet, index: u64, unresolvable: &mut Unresolvable) -> Vec<Server> {
    let mut out: Vec<Server> = Vec::with_capacity(set.len());
    // Addresses already in `out`, for names that resolve to a server listed otherwise: made
    // at the first name (a list of IP addresses alone, the usual one, needs none; the set has
    // no duplicate host:port).
    let mut seen: Option<AddrSet> = None;
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
            Host::Ip(ip) => {
                let a = SocketAddr::new(*ip, e.port);
                if let Some(seen) = seen.as_mut() {
                    seen.insert(a);
                }
                out.push(make(a));
            }
            Host::Name(name) => match unresolvable.resolve(name, e.port).await {
                Ok(addrs) => {
                    let mut addrs = addrs;
                    addrs.sort();
                    addrs.dedup();
                    let seen = seen.get_or_insert_with(|| out.iter().map(|s| s.addr).collect());
                    for a in addrs {
                        if seen.insert(a) {
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

impl Unresolvable {
    /// Resolves `name` through the system resolver (on the runtime's blocking pool), giving up
    /// after [`RESOLVE_TIMEOUT`].
    async fn resolve(&mut self, name: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
        let now = tokio::time::Instant::now();
        if let Some(until) = self.0.get(name) {
            if *until > now {
                return Err(format!(
                    "the resolver did not answer within {} s; not asked again before {} s",
                    RESOLVE_TIMEOUT.as_secs(),
                    (*until - now).as_secs()
                ));
            }
        }
        match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((name, port))).await {
            Ok(Ok(addrs)) => {
                self.0.remove(name);
                Ok(addrs.collect())
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => {
                self.0.insert(name.to_string(), now + UNRESOLVABLE_FOR);
                Err(format!("no answer from the resolver within {} s", RESOLVE_TIMEOUT.as_secs()))
            }
        }
    }
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
                        tracing::warn!("upstream \"{upstream}\": skipped {} entry \"{}\": {}", registry(sync), s.key, s.reason);
                    }
                    let set = f.value.into_endpoints().unwrap_or_default();
                    let servers = listing_order(None, to_servers(upstream, &set, f.index, &mut Unresolvable::default()).await);
                    if servers.is_empty() && !sync.allow_empty {
                        return Err(format!("{} has no servers for it (index {})", registry(sync), f.index));
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
    // Hostname lookups are bounded by RESOLVE_TIMEOUT; one still running is not waited for.
    rt.shutdown_background();
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

    fn panics_first_time(
        _client: Arc<GroupClient>,
        unit: Unit,
        mb: Arc<Mailbox>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        Box::pin(async move {
            let spec = &unit.members[0];
            if CALLS.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("boom in {}", spec.upstream);
            }
            mb.push(Update::Synced { id: spec.id, index: 7 });
            std::future::pending::<()>().await
        })
    }

    #[test]
    fn a_watch_that_panics_is_reported_and_restarted() {
        let mailbox = Mailbox::new();
        let spec = WatchSpec { id: 3, upstream: "app".into(), sync: UpstreamSync::default(), known: None };
        let mb = mailbox.clone();
        let groups = vec![Group { sync: UpstreamSync::default(), units: vec![Unit { kind: UnitKind::Single, members: vec![spec] }] }];
        let thread = std::thread::spawn(move || run(groups, 4, mb, panics_first_time));
        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !seen.iter().any(|u| matches!(u, Update::Synced { id: 3, .. })) && std::time::Instant::now() < deadline {
            seen.extend(mailbox.take());
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            seen.iter().any(|u| matches!(u, Update::Restarted { id: 3, message } if message.contains("panicked: boom in app"))),
            "{seen:?}"
        );
        assert!(seen.iter().any(|u| matches!(u, Update::Synced { id: 3, index: 7 })), "not restarted: {seen:?}");
        // Stopping returns at once and the thread ends by itself.
        mailbox.stop();
        thread.join().unwrap();
    }
}
