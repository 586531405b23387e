//! The Consul feed: keeps the served snapshot in step with Consul with a fixed number of
//! requests whatever the number of services (dns/README.md, "Watch plan"):
//!
//! - change detectors: blocking queries on `/v1/catalog/services` (wakes on any service
//!   registration, deregistration or update) and `/v1/catalog/nodes` (node changes; the
//!   services of a node whose address changed or that left are patched at once, below).
//!   A new index schedules one full read of the catalog, `/v1/internal/ui/nodes` (every node
//!   with its services and checks). Reads are coalesced (changes arriving during a read cause
//!   one more read, not one each) and spaced by their cost, so Consul spends at most
//!   `catalog_read_budget` (20%) of its time on them under constant churn;
//! - health overlays: blocking queries on `/v1/health/state/critical` (and `warning` when only
//!   passing instances are served). Consul indexes checks by status, so these are cheap, wake
//!   only when a check enters or leaves that state, and apply without a full read;
//! - patches: a service the detectors name (added, removed or retagged in the service list, or
//!   owning a check that changed state for an instance the snapshot does not know yet, e.g. a
//!   new instance turning passing) is read alone from `/v1/health/service/NAME` and patched
//!   in at once, until the next full read covers it;
//! - instance counts: when the service list's index moves, `/v1/internal/ui/services` (a
//!   summary per service, a tenth of the full read's cost) is read, spaced by the same budget;
//!   a service whose number of instances there differs from the snapshot's (an instance
//!   registered or deregistered without any other sign) is patched at once instead of
//!   waiting for the next full read. The counts go first: a full read does not start while
//!   they are being read, and a count read slowed by a full read already under way is
//!   spaced by what it costs alone, not by its slowed time;
//! - hot services: a service named by one of these changes (its instances come and go: it
//!   is being scaled) gets a blocking query of its own on `/v1/health/service/NAME`, for at
//!   most `hot_services` services at a time (the least recently changed gives its place up),
//!   so its next changes are seen in milliseconds whatever they are (an instance deregistered
//!   without a drain, re-registered with another port): the Consul load stays bounded by
//!   that number, not by the number of services;
//! - a full read every `resync_interval` regardless, as a safety net.
//!
//! A snapshot is rebuilt on a blocking thread and swapped in whole; answering never waits.
//! When Consul fails, the last snapshot keeps being served and the staleness is reported.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::mpsc;
use upsync_discovery::decode::{
    decode_check_states, decode_health_instances, decode_instance_counts, decode_node_addresses, decode_node_dump, decode_services,
    CheckState, HealthMode,
};
use upsync_discovery::{Backoff, Client, Endpoint, IndexEvent, Query, RateLimit, Watch, WatchOptions};

use crate::config::FeedConfig;
use crate::server::Shared;
use crate::snapshot::{Health, Instance, Snapshot, ZoneConfig};

/// A detector may send this many requests back to back, then a sustained rate: a single
/// change is seen at once, an index changing without pause cannot make it spin. The health
/// lists are cheap for Consul (read through its status index, a few entries); the catalog
/// lists grow with the number of services and each change costs a full read anyway.
const REQUEST_BURST: u32 = 10;
const HEALTH_REQUESTS_PER_SECOND: f64 = 200.0;
/// One service's list is small, but a flapping one must not make its watch spin.
const HOT_REQUESTS_PER_SECOND: f64 = 50.0;
/// Blocking-query wait of the hot watches (see `hot_watch`): 32 of them cost Consul about 3
/// small requests a second when nothing changes.
const HOT_WAIT: Duration = Duration::from_secs(10);
const CATALOG_REQUESTS_PER_SECOND: f64 = 100.0;
/// At most this many services are patched for one event; beyond, the full read does it.
const MAX_PATCHES: usize = 64;
/// The services of the nodes that moved or left are read alone up to this many (a node
/// leaving is a host going away: its services, even a few hundred, cost Consul less read one
/// by one, ~1.5 ms each, than a full read of a large catalog).
const MAX_NODE_PATCHES: usize = 256;
/// At most this many patch reads at a time: with the detectors, the hot watches and the
/// catalog reads, upsync-dns stays far below the 200 connections Consul accepts from one
/// client address by default (beyond, Consul resets new connections: those of the other
/// clients on the host too).
const PATCHES_IN_FLIGHT: usize = 8;
/// A change naming at most this many services makes them hot.
const MAX_HEAT: usize = 8;
/// Applying changes for longer than this is logged (debug): later changes wait meanwhile.
const SLOW_LOOP: Duration = Duration::from_millis(20);
/// A warning about an unreachable Consul is repeated this often while it lasts.
const STALE_LOG_EVERY: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Services,
    Nodes,
    Critical,
    Warning,
    Catalog,
    Patch,
    Counts,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Services => "catalog-services",
            Kind::Nodes => "catalog-nodes",
            Kind::Critical => "health-critical",
            Kind::Warning => "health-warning",
            Kind::Catalog => "node-dump",
            Kind::Patch => "health-service",
            Kind::Counts => "ui-services",
        }
    }
}

/// Instances read from Consul at `index`: the whole catalog, or one service (a patch).
#[derive(Default)]
struct Read {
    index: u64,
    /// Incremented when Consul's index goes backwards (see `State::epoch`).
    epoch: u64,
    endpoints: Vec<Endpoint>,
    /// For the whole catalog: service name -> its endpoints (indexes), node -> its services.
    by_service: HashMap<String, Vec<usize>>,
    by_node: HashMap<String, Vec<String>>,
}

impl Read {
    fn new(index: u64, epoch: u64, endpoints: Vec<Endpoint>) -> Read {
        Read { index, epoch, endpoints, ..Read::default() }
    }

    /// Indexes a whole-catalog read by service and by node.
    fn indexed(mut self) -> Read {
        for (i, e) in self.endpoints.iter().enumerate() {
            let service = e.service.clone().unwrap_or_default();
            let names = self.by_node.entry(e.node.clone().unwrap_or_default()).or_default();
            if !names.contains(&service) {
                names.push(service.clone());
            }
            self.by_service.entry(service).or_default().push(i);
        }
        self
    }
}

enum Event {
    /// A detector's index moved (or its first answer): its index and body. `reset`: the
    /// index went backwards (a restarted dev agent, a restored snapshot, a lagging server).
    Changed {
        kind: Kind,
        index: u64,
        body: Bytes,
        reset: bool,
    },
    /// A request succeeded (Consul is reachable).
    Ok(Kind),
    Failed {
        kind: Kind,
        error: String,
        retry_in: Duration,
    },
    Dumped(Read),
    /// A snapshot built aside from a full read (see `Feed::build_aside`), in `took`, with
    /// the `(node, service id)` of every instance of that read.
    Built {
        inputs: Inputs,
        snap: Result<Box<Snapshot>, String>,
        known: HashSet<(String, String)>,
        took: Duration,
    },
    Patched {
        service: String,
        read: Result<Read, String>,
    },
    /// A hot service's blocking query saw its index move.
    Watched {
        service: String,
        read: Read,
    },
    /// Instances per service (`/v1/internal/ui/services`), read in `epoch`, in `took`.
    Counted {
        epoch: u64,
        counts: HashMap<String, u64>,
        took: Duration,
    },
}

/// A catalog-wide read (the node dump, the instance counts): wanted after a change, at most
/// one in flight (changes meanwhile cause one more read, not one each), and spaced by its own
/// cost so that Consul spends at most `catalog_read_budget` of its time on it.
#[derive(Default)]
struct SpacedRead {
    wanted: bool,
    in_flight: bool,
    not_before: Option<tokio::time::Instant>,
    /// The read in flight ran beside the other catalog-wide read for a while: its time is
    /// partly the other's (they shared Consul's CPU) and must not stretch its own spacing.
    overlapped: bool,
    /// What the last read run alone took.
    alone: Option<Duration>,
}

impl SpacedRead {
    /// When the next read may start: `None` unless one is wanted and none is in flight.
    fn due(&self) -> Option<tokio::time::Instant> {
        (self.wanted && !self.in_flight).then(|| self.not_before.unwrap_or_else(tokio::time::Instant::now))
    }

    /// Starts a read while `other` (the other catalog-wide read) may be in flight.
    fn start_beside(&mut self, other: &mut SpacedRead) {
        (self.in_flight, self.wanted, self.not_before, self.overlapped) = (true, false, None, other.in_flight);
        other.overlapped |= other.in_flight;
    }

    /// The read failed: again after `retry_in`.
    fn failed(&mut self, retry_in: Duration) {
        (self.in_flight, self.wanted, self.not_before, self.overlapped) =
            (false, true, Some(tokio::time::Instant::now() + retry_in), false);
    }

    /// The answer belongs to data that is gone (an older epoch): read again.
    fn discarded(&mut self) {
        (self.in_flight, self.wanted, self.overlapped) = (false, true, false);
    }

    /// The read took `took`: the next one waits `cost × (1 / budget − 1)`, where the cost is
    /// `took`, or for a read that ran beside the other one what it takes alone (the last
    /// such read; at least half of `took`, in case the catalog grew since).
    fn done(&mut self, took: Duration, budget: f64) {
        let cost = if self.overlapped { took.min((took / 2).max(self.alone.unwrap_or(took))) } else { took };
        if !self.overlapped {
            self.alone = Some(took);
        }
        (self.in_flight, self.overlapped) = (false, false);
        self.not_before = Some(tokio::time::Instant::now() + cost.mul_f64(1.0 / budget - 1.0));
    }
}

/// The watch settings of a detector or hot watch: a burst, then `per_second`.
fn watch_options(wait: Duration, per_second: f64) -> WatchOptions {
    WatchOptions { wait, rate: RateLimit { burst: REQUEST_BURST, per_second }, backoff: Backoff::default(), ramp_from: None }
}

/// Blocking query reporting every change of `X-Consul-Index` (the watch's index mode: the
/// catalog detector's body, the list of service names, stays the same when an instance comes
/// or goes), and every other answer as [`Event::Ok`].
async fn detector(client: Client, kind: Kind, path: String, wait: Duration, tx: mpsc::Sender<Event>) {
    let rate = if matches!(kind, Kind::Critical | Kind::Warning) { HEALTH_REQUESTS_PER_SECOND } else { CATALOG_REQUESTS_PER_SECOND };
    let mut watch = Watch::new(client, Query::Raw { path }, watch_options(wait, rate));
    loop {
        let ev = match watch.next_index().await {
            IndexEvent::Moved { response, reset } => Event::Changed { kind, index: response.index, body: response.body, reset },
            IndexEvent::Same { .. } => Event::Ok(kind),
            // The watch waits `retry_in` before its next request.
            IndexEvent::Error { error, retry_in, .. } => Event::Failed { kind, error: error.to_string(), retry_in },
        };
        if tx.send(ev).await.is_err() {
            return;
        }
    }
}

/// Blocking query on one hot service (see the module doc): reports every change of its
/// index, until `retired` is set; then it ends after the request under way. It is not
/// aborted: Consul 1.8 goes on holding a blocking query whose client went away until its wait
/// ends, and counts its connection against `http_max_conns_per_client` meanwhile (aborting
/// watches as services cool down exhausted that limit in a bulk registration: Consul then
/// resets every new connection from the host). Its wait is short ([`HOT_WAIT`]) for the same
/// reason. Failures are retried with backoff and not reported: the detectors and the one-off
/// patches say whether Consul answers, and the full read covers the service anyway.
async fn hot_watch(client: Client, service: String, epoch: u64, retired: Arc<AtomicBool>, tx: mpsc::Sender<Event>) {
    let query = Query::HealthService { name: service.clone(), tag: None, mode: HealthMode::MarkDown };
    let path = query.path();
    let mut watch = Watch::new(client, query, watch_options(HOT_WAIT, HOT_REQUESTS_PER_SECOND));
    while !retired.load(Ordering::Relaxed) {
        let resp = match watch.next_index().await {
            IndexEvent::Moved { response, .. } => response,
            IndexEvent::Same { .. } => continue,
            IndexEvent::Error { error, retry_in, .. } => {
                tracing::debug!(%service, "hot service watch failed: {error}");
                // The backoff is waited out here rather than at the start of the next request,
                // so that a watch given up meanwhile ends without sending one.
                tokio::time::sleep(retry_in).await;
                continue;
            }
        };
        match decode_health_instances(if resp.status == 404 { b"" } else { &resp.body }) {
            Ok(decoded) => {
                log_skipped(&decoded.skipped);
                let read = Read::new(resp.index, epoch, decoded.value);
                if tx.send(Event::Watched { service: service.clone(), read }).await.is_err() {
                    return;
                }
            }
            Err(e) => tracing::debug!(%service, "{} answered {path} with {e}", resp.address),
        }
    }
}

fn log_skipped(skipped: &[upsync_discovery::Skipped]) {
    for s in skipped.iter().take(20) {
        tracing::warn!(instance = %s.key, "instance left out of DNS: {}", s.reason);
    }
}

/// One full read of the catalog, decoded off the runtime's threads.
async fn read_catalog(client: Client, path: String, epoch: u64, metrics: Arc<crate::metrics::Metrics>) -> Result<Read, String> {
    let started = Instant::now();
    let resp = client.get(&path, None).await.map_err(|e| e.to_string())?;
    let bytes = resp.body.len();
    let (index, address) = (resp.index, resp.address.clone());
    let decoded =
        tokio::task::spawn_blocking(move || decode_node_dump(&resp.body).map(|d| (Read::new(index, epoch, d.value).indexed(), d.skipped)))
            .await
            .map_err(|e| format!("decoding the node dump: {e}"))?
            .map_err(|e| format!("{address} answered {path} with {e}"))?;
    let (read, skipped) = decoded;
    log_skipped(&skipped);
    let took = started.elapsed();
    let f = &metrics.feed;
    f.catalog_reads.inc();
    f.catalog_read_seconds.set(took.as_secs_f64());
    f.catalog_read_bytes.set(bytes as i64);
    tracing::debug!(index, bytes, instances = read.endpoints.len(), ms = took.as_millis() as u64, "read the catalog");
    Ok(read)
}

/// One service, from `/v1/health/service/NAME`.
async fn read_service(client: Client, service: String, epoch: u64) -> Result<Read, String> {
    let path = Query::HealthService { name: service, tag: None, mode: HealthMode::MarkDown }.path();
    let resp = client.get(&path, None).await.map_err(|e| e.to_string())?;
    let decoded = decode_health_instances(if resp.status == 404 { b"" } else { &resp.body })
        .map_err(|e| format!("{} answered {path} with {e}", resp.address))?;
    log_skipped(&decoded.skipped);
    Ok(Read::new(resp.index, epoch, decoded.value))
}

/// Instances per service from `/v1/internal/ui/services`, decoded off the runtime's threads;
/// and how long the read took.
async fn read_counts(client: Client, path: String) -> Result<(HashMap<String, u64>, Duration), String> {
    let started = Instant::now();
    let resp = client.get(&path, None).await.map_err(|e| e.to_string())?;
    let address = resp.address.clone();
    let counts = tokio::task::spawn_blocking(move || decode_instance_counts(&resp.body))
        .await
        .map_err(|e| format!("decoding the service summary: {e}"))?
        .map_err(|e| format!("{address} answered {path} with {e}"))?;
    Ok((counts, started.elapsed()))
}

/// Services whose number of instances in Consul (`counts`) differs from what the dump and
/// the patches hold, and services they hold instances of that Consul no longer lists.
///
/// Compared with our own view, not with the previous count read: an instance registered and
/// deregistered between two count reads leaves the count unchanged, but not our view of it.
/// An instance the decoders skip (a malformed address) keeps its service differing; it is
/// then read again at each count read, which the budget spaces.
fn stale_services(dump: &Read, patches: &HashMap<String, Arc<Read>>, counts: &HashMap<String, u64>) -> Vec<String> {
    let ours =
        |name: &str| patches.get(name).map(|p| p.endpoints.len()).or_else(|| dump.by_service.get(name).map(Vec::len)).unwrap_or(0) as u64;
    let differing = counts.iter().filter(|(name, n)| ours(name) != **n).map(|(name, _)| name.clone());
    let gone =
        dump.by_service.keys().chain(patches.keys()).filter(|name| !name.is_empty() && !counts.contains_key(*name) && ours(name) > 0);
    let mut names: Vec<String> = differing.chain(gone.cloned()).collect();
    names.sort();
    names.dedup();
    names
}

/// Non-passing checks of one state, from `/v1/health/state/<state>`.
struct Overlay {
    index: u64,
    /// node -> service id -> service name, for service checks in that state (nested so a
    /// lookup by `&str` allocates nothing: it runs for every instance at each rebuild).
    services: HashMap<String, HashMap<String, String>>,
    /// Nodes with a node-level check in that state.
    nodes: HashSet<String>,
}

impl Overlay {
    fn new(index: u64, checks: Vec<CheckState>) -> Overlay {
        let mut o = Overlay { index, services: HashMap::new(), nodes: HashSet::new() };
        for c in checks {
            if c.service_id.is_empty() {
                o.nodes.insert(c.node);
            } else {
                o.services.entry(c.node).or_default().insert(c.service_id, c.service_name);
            }
        }
        o
    }

    fn covers(&self, node: &str, service_id: &str) -> bool {
        self.nodes.contains(node) || self.services.get(node).is_some_and(|m| m.contains_key(service_id))
    }

    /// `(node, service id, service name)` of every service check in that state.
    fn entries(&self) -> impl Iterator<Item = (&str, &str, &str)> {
        self.services.iter().flat_map(|(n, m)| m.iter().map(move |(id, name)| (n.as_str(), id.as_str(), name.as_str())))
    }
}

/// Health of `e`, read at index `read_index`: from the overlays newer than that read, else
/// from the read itself.
fn health(e: &Endpoint, read_index: u64, critical: Option<&Overlay>, warning: Option<&Overlay>) -> Health {
    let (node, id) = (e.node.as_deref().unwrap_or(""), e.service_id.as_deref().unwrap_or(""));
    let state = |o: Option<&Overlay>, h: Health| match o.filter(|o| o.index >= read_index) {
        Some(o) => o.covers(node, id),
        None => e.health == h,
    };
    let (critical, warning) = (state(critical, Health::Critical), state(warning, Health::Warning));
    if critical {
        Health::Critical
    } else if warning {
        Health::Warning
    } else {
        Health::Passing
    }
}

fn instance(e: &Endpoint, health: Health) -> Instance {
    Instance {
        service: e.service.clone().unwrap_or_default(),
        id: e.service_id.clone().unwrap_or_default(),
        node: e.node.clone().unwrap_or_default(),
        host: e.host.clone(),
        port: e.port,
        tags: e.tags.clone(),
        meta: e.meta.clone(),
        weight: e.weight,
        backup: e.backup,
        down: e.down,
        health,
    }
}

/// What a snapshot is built from.
#[derive(Clone)]
struct Inputs {
    dump: Arc<Read>,
    /// Services read alone after the dump (only those newer than it).
    patches: HashMap<String, Arc<Read>>,
    critical: Option<Arc<Overlay>>,
    warning: Option<Arc<Overlay>>,
}

/// The instances of `service` as the inputs describe them (a patch if one is newer than the
/// dump, else the dump's).
fn service_instances(inp: &Inputs, service: &str) -> Vec<Instance> {
    let (c, w) = (inp.critical.as_deref(), inp.warning.as_deref());
    match inp.patches.get(service) {
        Some(p) => p.endpoints.iter().map(|e| instance(e, health(e, p.index, c, w))).collect(),
        None => {
            let d = &inp.dump;
            let idx = d.by_service.get(service).map(Vec::as_slice).unwrap_or_default();
            idx.iter().map(|&i| &d.endpoints[i]).map(|e| instance(e, health(e, d.index, c, w))).collect()
        }
    }
}

/// Services with an instance whose health may differ between two sets of inputs with the same
/// dump (the overlays changed). When the overlays of both cover the dump (the usual case
/// between two full reads), the difference of the overlays names them directly; otherwise one
/// pass over every instance finds them.
fn health_changed(before: &Inputs, after: &Inputs) -> HashSet<String> {
    let same = |a: &Option<Arc<Overlay>>, b: &Option<Arc<Overlay>>| match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    };
    if same(&before.critical, &after.critical) && same(&before.warning, &after.warning) {
        // The same overlays: an instance's health can only differ through its patch, and
        // `patches_changed` names those services (no pass over the 100,000 instances).
        return HashSet::new();
    }
    let covers = |o: Option<&Arc<Overlay>>, present: bool| o.map_or(!present, |o| o.index >= after.dump.index);
    let both = |i: &Inputs| covers(i.critical.as_ref(), true) && covers(i.warning.as_ref(), after.warning.is_some());
    if !(both(before) && both(after)) {
        return health_changed_scan(before, after);
    }
    let mut names: HashSet<String> = after.patches.keys().cloned().collect();
    for (old, new) in [(&before.critical, &after.critical), (&before.warning, &after.warning)] {
        let (Some(old), Some(new)) = (old, new) else { continue };
        let in_set = |o: &Overlay, n: &str, id: &str| o.services.get(n).is_some_and(|m| m.contains_key(id));
        names.extend(new.entries().filter(|(n, id, _)| !in_set(old, n, id)).map(|(_, _, name)| name.to_string()));
        names.extend(old.entries().filter(|(n, id, _)| !in_set(new, n, id)).map(|(_, _, name)| name.to_string()));
        for node in new.nodes.symmetric_difference(&old.nodes) {
            names.extend(after.dump.by_node.get(node).into_iter().flatten().cloned());
        }
    }
    names
}

/// Services whose patch was read, replaced or dropped between two sets of inputs.
fn patches_changed(before: &Inputs, after: &Inputs) -> HashSet<String> {
    let differs = |a: &HashMap<String, Arc<Read>>, b: &HashMap<String, Arc<Read>>| {
        a.iter().filter(|(k, p)| b.get(*k).is_none_or(|q| !Arc::ptr_eq(p, q))).map(|(k, _)| k.clone()).collect::<Vec<_>>()
    };
    differs(&after.patches, &before.patches).into_iter().chain(differs(&before.patches, &after.patches)).collect()
}

/// [`health_changed`] by comparing every instance's health: no allocation per instance.
fn health_changed_scan(before: &Inputs, after: &Inputs) -> HashSet<String> {
    let mut names = HashSet::new();
    let (c0, w0, c1, w1) = (before.critical.as_deref(), before.warning.as_deref(), after.critical.as_deref(), after.warning.as_deref());
    let mut check = |e: &Endpoint, i0: u64, i1: u64| {
        if health(e, i0, c0, w0) != health(e, i1, c1, w1) {
            names.insert(e.service.clone().unwrap_or_default());
        }
    };
    for e in &after.dump.endpoints {
        check(e, after.dump.index, after.dump.index);
    }
    for (name, p) in &after.patches {
        let i0 = before.patches.get(name).map_or(after.dump.index, |b| b.index);
        for e in &p.endpoints {
            check(e, i0, p.index);
        }
    }
    names
}

fn inputs_index(inp: &Inputs) -> u64 {
    [Some(inp.dump.index), inp.critical.as_ref().map(|o| o.index), inp.warning.as_ref().map(|o| o.index)]
        .into_iter()
        .flatten()
        .chain(inp.patches.values().map(|p| p.index))
        .max()
        .unwrap_or(0)
}

fn build(zone: Arc<ZoneConfig>, inp: &Inputs) -> Snapshot {
    let (dump, c, w) = (&inp.dump, inp.critical.as_deref(), inp.warning.as_deref());
    let patched = |e: &Endpoint| !inp.patches.is_empty() && inp.patches.contains_key(e.service.as_deref().unwrap_or(""));
    let mut instances: Vec<Instance> =
        dump.endpoints.iter().filter(|e| !patched(e)).map(|e| instance(e, health(e, dump.index, c, w))).collect();
    for p in inp.patches.values() {
        instances.extend(p.endpoints.iter().map(|e| instance(e, health(e, p.index, c, w))));
    }
    Snapshot::build(inputs_index(inp), zone, instances)
}

/// The feed's state machine.
pub struct Feed {
    cfg: FeedConfig,
    zone: Arc<ZoneConfig>,
    shared: Arc<Shared>,
    client: Client,
}

/// Permits for patch reads, `PATCHES_IN_FLIGHT` of them.
#[derive(Clone)]
struct PatchSlots(Arc<tokio::sync::Semaphore>);

impl Default for PatchSlots {
    fn default() -> Self {
        PatchSlots(Arc::new(tokio::sync::Semaphore::new(PATCHES_IN_FLIGHT)))
    }
}

#[derive(Default)]
struct State {
    dump: Option<Arc<Read>>,
    /// The inputs the snapshot being served was built from.
    built_from: Option<Inputs>,
    patches: HashMap<String, Arc<Read>>,
    /// `(node, service id)` of every instance the dump and patches know.
    known: HashSet<(String, String)>,
    /// Hot services: when each was last named by a change, and its blocking query.
    hot: HashMap<String, (Instant, Arc<AtomicBool>)>,
    /// The hot watches, and those given up that are finishing their last request.
    hot_tasks: tokio::task::JoinSet<()>,
    /// Permits for patch reads (`PATCHES_IN_FLIGHT`).
    patch_slots: PatchSlots,
    /// Services being read alone, and those to read again once that read is back.
    patching: HashSet<String>,
    repatch: HashSet<String>,
    critical: Option<Arc<Overlay>>,
    warning: Option<Arc<Overlay>>,
    /// The service list of the last `/v1/catalog/services` answer.
    services: Option<BTreeMap<String, Vec<String>>>,
    /// Node name -> address, from the last `/v1/catalog/nodes` answer.
    nodes: Option<HashMap<String, String>>,
    /// Reads of the instance counts (`/v1/internal/ui/services`), wanted when the service
    /// list's index moves.
    counts: SpacedRead,
    /// The next rebuild must build everything (Consul's index went backwards).
    full_rebuild: bool,
    /// Index of the full read being built into a snapshot aside, if one is; a full read
    /// that arrived meanwhile waits for it.
    building: Option<u64>,
    queued_dump: Option<Read>,
    /// A snapshot built aside, to install at the next rebuild with the inputs it came from.
    ready: Option<(Inputs, Box<Snapshot>, Duration)>,
    /// Full reads of the catalog, wanted when a detector saw a change the dump does not have.
    catalog: SpacedRead,
    /// Incremented when Consul's index goes backwards: reads started before belong to the
    /// old data and are discarded, and the overlays and patches are dropped (the next read
    /// carries the check states anyway).
    epoch: u64,
    /// Detectors whose last request failed, with the error.
    failing: Vec<(Kind, String)>,
    stale_logged: Option<Instant>,
    last_ok: Option<Instant>,
}

impl State {
    /// Index of the newest full read, served or being built.
    fn dump_index(&self) -> u64 {
        self.dump.as_ref().map_or(0, |d| d.index).max(self.building.unwrap_or(0))
    }

    fn know(&mut self, endpoints: &[Endpoint]) {
        self.known.extend(endpoints.iter().map(instance_key));
    }
}

impl Feed {
    pub fn new(cfg: FeedConfig, zone: Arc<ZoneConfig>, shared: Arc<Shared>) -> anyhow::Result<Feed> {
        let client = Client::new(cfg.consul.clone()).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Feed { cfg, zone, shared, client })
    }

    /// Runs until the task is dropped.
    pub async fn run(self) {
        let (tx, mut rx) = mpsc::channel(256);
        let mut detectors = vec![
            (Kind::Services, "/v1/catalog/services"),
            (Kind::Nodes, "/v1/catalog/nodes"),
            (Kind::Critical, "/v1/health/state/critical"),
        ];
        if self.zone.only_passing {
            detectors.push((Kind::Warning, "/v1/health/state/warning"));
        }
        // Dropped with this future: the detectors stop with the feed.
        let mut tasks = tokio::task::JoinSet::new();
        for (kind, path) in detectors {
            tasks.spawn(detector(self.client.clone(), kind, path.to_string(), self.cfg.wait, tx.clone()));
        }
        // The client adds `dc` and the consistency mode.
        let dump_path = "/v1/internal/ui/nodes".to_string();
        let counts_path = "/v1/internal/ui/services".to_string();
        let mut st = State::default();
        let mut resync = tokio::time::interval(self.cfg.resync_interval);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resync.tick().await;
        let mut stale_tick = tokio::time::interval(STALE_LOG_EVERY);
        stale_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // The counts first: they name the service that changed in a fraction of the full
            // read's time, which must not make them wait or slow them down by running beside.
            let counts_now = st.counts.in_flight || st.counts.due().is_some_and(|t| t <= tokio::time::Instant::now());
            let (read_at, count_at) = (st.catalog.due().filter(|_| !counts_now), st.counts.due());
            tokio::select! {
                ev = rx.recv() => {
                    let Some(ev) = ev else { return };
                    let busy = Instant::now();
                    let mut dirty = self.on_event(&mut st, ev, &tx);
                    // Coalesce what queued up meanwhile into one rebuild.
                    while let Ok(ev) = rx.try_recv() {
                        dirty |= self.on_event(&mut st, ev, &tx);
                    }
                    if dirty {
                        self.rebuild(&mut st).await;
                    }
                    if busy.elapsed() > SLOW_LOOP {
                        tracing::debug!(ms = busy.elapsed().as_millis() as u64, "the feed took long to apply changes");
                    }
                }
                _ = tokio::time::sleep_until(read_at.unwrap_or_else(tokio::time::Instant::now)), if read_at.is_some() => {
                    st.catalog.start_beside(&mut st.counts);
                    let (client, path, tx, metrics, epoch) = (self.client.clone(), dump_path.clone(), tx.clone(), self.shared.metrics.clone(), st.epoch);
                    tokio::spawn(async move {
                        let ev = match read_catalog(client, path, epoch, metrics).await {
                            Ok(read) => Event::Dumped(read),
                            Err(error) => Event::Failed { kind: Kind::Catalog, error, retry_in: Duration::from_secs(1) },
                        };
                        let _ = tx.send(ev).await;
                    });
                }
                _ = tokio::time::sleep_until(count_at.unwrap_or_else(tokio::time::Instant::now)), if count_at.is_some() => {
                    st.counts.start_beside(&mut st.catalog);
                    let (client, path, tx, epoch) = (self.client.clone(), counts_path.clone(), tx.clone(), st.epoch);
                    tokio::spawn(async move {
                        let ev = match read_counts(client, path).await {
                            Ok((counts, took)) => Event::Counted { epoch, counts, took },
                            Err(error) => Event::Failed { kind: Kind::Counts, error, retry_in: Duration::from_secs(1) },
                        };
                        let _ = tx.send(ev).await;
                    });
                }
                _ = resync.tick() => {
                    // A read even without a change (only once a first one was wanted).
                    st.catalog.wanted |= st.dump.is_some();
                }
                _ = stale_tick.tick() => self.log_stale(&mut st, false),
            }
        }
    }

    /// Reads `services` alone (at most [`MAX_PATCHES`]; more are left to the full read) and
    /// makes them hot: their instances changed.
    fn patch(&self, st: &mut State, services: Vec<String>, tx: &mpsc::Sender<Event>) {
        // A few services changing is a deployment or a scaling going on: they will change
        // again. Dozens at once (a bulk registration) would only churn the hot watches.
        if st.dump.is_some() && services.len() <= MAX_HEAT {
            self.heat(st, &services, tx);
        }
        self.read_alone(st, services, MAX_PATCHES, tx);
    }

    /// Reads `services` alone (at most `cap`; more are left to the full read).
    fn read_alone(&self, st: &mut State, services: Vec<String>, cap: usize, tx: &mpsc::Sender<Event>) {
        if st.dump.is_none() || services.len() > cap {
            return;
        }
        for service in services {
            if !st.patching.insert(service.clone()) {
                st.repatch.insert(service);
                continue;
            }
            let (client, tx, epoch, slots) = (self.client.clone(), tx.clone(), st.epoch, st.patch_slots.clone());
            tokio::spawn(async move {
                let Ok(_slot) = slots.0.acquire().await else { return };
                let read = read_service(client, service.clone(), epoch).await;
                let _ = tx.send(Event::Patched { service, read }).await;
            });
        }
    }

    /// Makes `services` hot (see the module doc), giving up the least recently changed ones
    /// beyond `hot_services`. The watches given up finish their last request first (see
    /// `hot_watch`); while as many are finishing as `hot_services`, no service is made hot,
    /// so upsync-dns never holds more than twice `hot_services` connections for them.
    fn heat(&self, st: &mut State, services: &[String], tx: &mpsc::Sender<Event>) {
        let now = Instant::now();
        // Reap the watches that ended (a JoinSet keeps their results until then).
        while st.hot_tasks.try_join_next().is_some() {}
        for service in services {
            if let Some(entry) = st.hot.get_mut(service) {
                entry.0 = now;
                continue;
            }
            if st.hot_tasks.len() >= 2 * self.cfg.hot_services {
                break;
            }
            if st.hot.len() >= self.cfg.hot_services {
                let coldest = st.hot.iter().min_by_key(|(_, (at, _))| *at).map(|(name, _)| name.clone());
                if let Some((name, (_, retired))) = coldest.and_then(|name| st.hot.remove_entry(&name)) {
                    tracing::debug!(service = %name, "no longer watched alone (changed least recently)");
                    retired.store(true, Ordering::Relaxed);
                }
            }
            let retired = Arc::new(AtomicBool::new(false));
            let (client, name, epoch, tx) = (self.client.clone(), service.clone(), st.epoch, tx.clone());
            tracing::debug!(%service, "watched alone from now on (its instances changed)");
            st.hot_tasks.spawn(hot_watch(client, name, epoch, retired.clone(), tx));
            st.hot.insert(service.clone(), (now, retired));
        }
        self.shared.metrics.feed.hot_services.set(st.hot.len() as i64);
    }

    /// Services named by a change of a health overlay whose instance the snapshot does not
    /// know yet (a new instance turning passing or critical).
    fn unknown_in_diff(st: &State, old: Option<&Overlay>, new: &Overlay) -> Vec<String> {
        let in_old = |n: &str, id: &str| old.is_some_and(|o| o.services.get(n).is_some_and(|m| m.contains_key(id)));
        let in_new = |n: &str, id: &str| new.services.get(n).is_some_and(|m| m.contains_key(id));
        let entered = new.entries().filter(|(n, id, _)| !in_old(n, id));
        let left = old.into_iter().flat_map(Overlay::entries).filter(|(n, id, _)| !in_new(n, id));
        let mut names: Vec<String> = entered
            .chain(left)
            .filter(|(n, id, _)| !st.known.contains(&(n.to_string(), id.to_string())))
            .map(|(_, _, name)| name.to_string())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Services with instances on the nodes whose address changed or that left between two
    /// node lists (in the dump or in a patch).
    fn on_moved_nodes(st: &State, old: &HashMap<String, String>, new: &HashMap<String, String>) -> Vec<String> {
        let moved: HashSet<&str> = old.iter().filter(|(n, a)| new.get(*n) != Some(*a)).map(|(n, _)| n.as_str()).collect();
        if moved.is_empty() {
            return Vec::new();
        }
        let in_dump = st.dump.iter().flat_map(|d| moved.iter().filter_map(|n| d.by_node.get(*n)).flatten().cloned());
        let in_patches = st
            .patches
            .iter()
            .filter(|(_, p)| p.endpoints.iter().any(|e| e.node.as_deref().is_some_and(|n| moved.contains(n))))
            .map(|(name, _)| name.clone());
        let mut names: Vec<String> = in_dump.chain(in_patches).collect();
        names.sort();
        names.dedup();
        names
    }

    /// Services added, removed or retagged between two service lists.
    fn list_diff(old: &BTreeMap<String, Vec<String>>, new: &BTreeMap<String, Vec<String>>) -> Vec<String> {
        let changed = new.iter().filter(|(k, v)| old.get(*k) != Some(*v)).map(|(k, _)| k.clone());
        changed.chain(old.keys().filter(|k| !new.contains_key(*k)).cloned()).collect()
    }

    /// Applies one event; whether the snapshot must be rebuilt.
    fn on_event(&self, st: &mut State, ev: Event, tx: &mpsc::Sender<Event>) -> bool {
        let m = &self.shared.metrics;
        let now = Instant::now();
        let ok = |st: &mut State, kind: Kind| {
            st.last_ok = Some(now);
            m.consul_ok(now);
            if let Some(pos) = st.failing.iter().position(|(k, _)| *k == kind) {
                st.failing.remove(pos);
                if st.failing.is_empty() {
                    tracing::info!(index = self.shared.snapshot.load().index, "Consul answers again; the DNS data follows it again");
                    st.stale_logged = None;
                }
            }
            m.feed.consul_up.set(i64::from(st.failing.is_empty()));
        };
        match ev {
            Event::Ok(kind) => {
                ok(st, kind);
                false
            }
            Event::Changed { kind, index, body, reset } => {
                tracing::trace!(watch = kind.name(), index, bytes = body.len(), "Consul index moved");
                ok(st, kind);
                if reset {
                    tracing::info!(
                        watch = kind.name(),
                        index,
                        "Consul's index went backwards (restarted or restored?); reading the catalog afresh"
                    );
                    st.epoch += 1;
                    for (_, (_, retired)) in st.hot.drain() {
                        retired.store(true, Ordering::Relaxed);
                    }
                    st.critical = None;
                    st.warning = None;
                    st.patches.clear();
                    st.services = None;
                    st.nodes = None;
                    st.catalog.wanted = true;
                    st.full_rebuild = true;
                }
                match kind {
                    Kind::Services | Kind::Nodes => {
                        st.catalog.wanted |= index > st.dump_index();
                        if kind == Kind::Nodes {
                            // A node's address moved or the node left: its services, read
                            // alone (an instance without an address of its own is served at
                            // its node's), without waiting for the full read.
                            match decode_node_addresses(&body) {
                                Ok(nodes) => {
                                    let moved = st.nodes.as_ref().map(|old| Self::on_moved_nodes(st, old, &nodes));
                                    st.nodes = Some(nodes);
                                    self.read_alone(st, moved.unwrap_or_default(), MAX_NODE_PATCHES, tx);
                                }
                                Err(e) => tracing::debug!("decoding /v1/catalog/nodes: {e}"),
                            }
                        }
                        if kind == Kind::Services {
                            // Which service gained or lost an instance: the counts say.
                            st.counts.wanted = true;
                            match decode_services(&body) {
                                Ok(list) => {
                                    let changed = st.services.as_ref().map(|old| Self::list_diff(old, &list));
                                    st.services = Some(list);
                                    self.patch(st, changed.unwrap_or_default(), tx);
                                }
                                Err(e) => tracing::debug!("decoding /v1/catalog/services: {e}"),
                            }
                        }
                        false
                    }
                    Kind::Critical | Kind::Warning => match decode_check_states(&body) {
                        Ok(checks) => {
                            let new = Overlay::new(index, checks);
                            let old = if kind == Kind::Critical { st.critical.clone() } else { st.warning.clone() };
                            let unknown = Self::unknown_in_diff(st, old.as_deref(), &new);
                            self.patch(st, unknown, tx);
                            let slot = if kind == Kind::Critical { &mut st.critical } else { &mut st.warning };
                            *slot = Some(Arc::new(new));
                            st.dump.is_some()
                        }
                        Err(e) => {
                            self.failed(st, kind, format!("decoding /v1/health/state: {e}"));
                            false
                        }
                    },
                    Kind::Catalog | Kind::Patch | Kind::Counts => false,
                }
            }
            Event::Failed { kind, error, retry_in } => {
                match kind {
                    Kind::Catalog => st.catalog.failed(retry_in),
                    Kind::Counts => st.counts.failed(retry_in),
                    _ => {}
                }
                tracing::debug!(watch = kind.name(), ?retry_in, "Consul request failed: {error}");
                self.failed(st, kind, error);
                false
            }
            Event::Dumped(read) => {
                ok(st, Kind::Catalog);
                if read.epoch != st.epoch {
                    st.catalog.discarded();
                    return false;
                }
                let took = Duration::from_secs_f64(m.feed.catalog_read_seconds.get().max(0.0));
                st.catalog.done(took, self.cfg.catalog_read_budget);
                if st.dump.is_none() {
                    tracing::info!(
                        index = read.index,
                        instances = read.endpoints.len(),
                        ms = took.as_millis() as u64,
                        "first read of the Consul catalog"
                    );
                }
                if st.building.is_some() {
                    st.queued_dump = Some(read);
                } else {
                    self.build_aside(st, read, tx);
                }
                false
            }
            Event::Built { inputs, snap, known, took } => {
                st.building = None;
                let current = inputs.dump.epoch == st.epoch;
                let installed = match snap {
                    Ok(snap) if current => {
                        // From now on the new read is the base; patches it covers are dropped.
                        st.patches.retain(|_, p| p.index > inputs.dump.index);
                        drop_aside(std::mem::replace(&mut st.known, known));
                        let patches: Vec<Arc<Read>> = st.patches.values().cloned().collect();
                        for p in patches {
                            st.know(&p.endpoints);
                        }
                        drop_aside(st.dump.replace(inputs.dump.clone()));
                        st.ready = Some((inputs, snap, took));
                        true
                    }
                    Ok(_) => false,
                    Err(e) => {
                        tracing::error!("building the DNS snapshot from a full read failed ({e}); still answering from the previous one");
                        st.catalog.wanted = true;
                        false
                    }
                };
                if let Some(next) = st.queued_dump.take().filter(|r| r.epoch == st.epoch) {
                    self.build_aside(st, next, tx);
                }
                installed
            }
            Event::Counted { epoch, counts, took } => {
                ok(st, Kind::Counts);
                if epoch != st.epoch {
                    st.counts.discarded();
                    return false;
                }
                st.counts.done(took, self.cfg.catalog_read_budget);
                tracing::debug!(services = counts.len(), ms = took.as_millis() as u64, "read the instance counts");
                let stale = st.dump.as_ref().map(|d| stale_services(d, &st.patches, &counts)).unwrap_or_default();
                if !stale.is_empty() {
                    tracing::debug!(services = ?stale, "instance counts differ from the snapshot's; reading those services alone");
                }
                self.patch(st, stale, tx);
                false
            }
            Event::Patched { service, read } => {
                st.patching.remove(&service);
                if st.repatch.remove(&service) {
                    self.patch(st, vec![service.clone()], tx);
                }
                let read = match read {
                    Ok(r) => r,
                    Err(error) => {
                        // The full read scheduled by the same change covers it.
                        self.failed(st, Kind::Patch, error);
                        return false;
                    }
                };
                ok(st, Kind::Patch);
                Self::apply_patch(st, service, read)
            }
            Event::Watched { service, read } => Self::apply_patch(st, service, read),
        }
    }

    /// Puts a service read alone in place of the full read's view of it, if newer than both
    /// that and the service's previous patch; whether the snapshot must be rebuilt.
    fn apply_patch(st: &mut State, service: String, read: Read) -> bool {
        let newer = st.patches.get(&service).is_none_or(|p| read.index > p.index);
        if read.epoch != st.epoch || st.dump.as_ref().is_none_or(|d| read.index <= d.index) || !newer {
            return false;
        }
        tracing::debug!(%service, index = read.index, instances = read.endpoints.len(), "patched one service");
        st.know(&read.endpoints);
        st.patches.insert(service, Arc::new(read));
        true
    }

    fn failed(&self, st: &mut State, kind: Kind, error: String) {
        self.shared.metrics.feed.consul_errors.get_or_create(&[("watch", kind.name())]).inc();
        self.shared.metrics.feed.consul_up.set(0);
        let first = st.failing.is_empty();
        match st.failing.iter_mut().find(|(k, _)| *k == kind) {
            Some(entry) => entry.1 = error,
            None => st.failing.push((kind, error)),
        }
        if first {
            self.log_stale(st, true);
        }
    }

    /// Warns that answers come from an old snapshot (at once, then every 30 s while it lasts).
    fn log_stale(&self, st: &mut State, first: bool) {
        let Some((kind, error)) = st.failing.first() else { return };
        if !first && st.stale_logged.is_some_and(|t| t.elapsed() < STALE_LOG_EVERY) {
            return;
        }
        st.stale_logged = Some(Instant::now());
        let snap = self.shared.snapshot.load();
        let stale = st.last_ok.map_or(0, |t| t.elapsed().as_secs());
        tracing::warn!(
            watch = kind.name(),
            snapshot_index = snap.index,
            stale_seconds = stale,
            "Consul is not answering ({error}); answering from the last snapshot (index {}, {} services) until it does",
            snap.index,
            snap.stats.services
        );
    }

    /// Builds a snapshot from a full read on a blocking thread, while the event loop goes on
    /// applying changes to the snapshot being served (at 100,000 instances a full build takes
    /// about half a second: changes seen meanwhile must not wait for it). `Event::Built`
    /// brings it back; the next rebuild installs it and applies what changed meanwhile.
    fn build_aside(&self, st: &mut State, read: Read, tx: &mpsc::Sender<Event>) {
        st.building = Some(read.index);
        let dump = Arc::new(read);
        let patches = st.patches.iter().filter(|(_, p)| p.index > dump.index).map(|(k, p)| (k.clone(), p.clone())).collect();
        let inputs = Inputs { dump, patches, critical: st.critical.clone(), warning: st.warning.clone() };
        let (zone, tx) = (self.zone.clone(), tx.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let aside = inputs.clone();
            let built = tokio::task::spawn_blocking(move || {
                let known = aside.dump.endpoints.iter().map(instance_key).collect();
                (Box::new(build(zone, &aside)), known)
            })
            .await
            .map_err(|e| e.to_string());
            let (snap, known) = match built {
                Ok((snap, known)) => (Ok(snap), known),
                Err(e) => (Err(e), HashSet::new()),
            };
            let _ = tx.send(Event::Built { inputs, snap, known, took: started.elapsed() }).await;
        });
    }

    /// Brings the served snapshot up to date and swaps it in: from a snapshot built aside if
    /// one is ready, else from the one being served, it rebuilds off the runtime only the
    /// services that changed since the inputs of that base (sharing the others), or
    /// everything when nothing can be shared. One swap: answers never go back to the older
    /// state a snapshot built aside started from.
    async fn rebuild(&self, st: &mut State) {
        let (current, built_aside) = match st.ready.take() {
            Some((inputs, snap, took)) => {
                if st.built_from.is_none() {
                    tracing::info!(index = snap.index, instances = snap.stats.instances, "first snapshot built from the Consul catalog");
                }
                drop_aside(st.built_from.replace(inputs));
                (Arc::from(snap), Some(took))
            }
            None => (self.shared.snapshot.load_full(), None),
        };
        let Some(dump) = st.dump.clone() else { return };
        let full = std::mem::take(&mut st.full_rebuild);
        let inputs = Inputs { dump, patches: st.patches.clone(), critical: st.critical.clone(), warning: st.warning.clone() };
        let before = st.built_from.replace(inputs.clone());
        let zone = self.zone.clone();
        let started = Instant::now();
        let base = built_aside.is_some().then(|| current.clone());
        let work = move || {
            let Some(before) = before.filter(|b| !full && current.synced && Arc::ptr_eq(&b.dump, &inputs.dump)) else {
                return Some(Arc::new(build(zone, &inputs)));
            };
            let mut names = patches_changed(&before, &inputs);
            names.extend(health_changed(&before, &inputs));
            if names.is_empty() && inputs_index(&inputs) <= current.index {
                // Nothing to change, unless the base itself is new.
                return base;
            }
            let changed = names.into_iter().map(|name| {
                let list = service_instances(&inputs, &name);
                (name, list)
            });
            Some(Arc::new(current.with_services(inputs_index(&inputs).max(current.index), changed.collect())))
        };
        match tokio::task::spawn_blocking(work).await {
            Ok(Some(snap)) => self.install(st, snap, built_aside.unwrap_or_default() + started.elapsed()),
            Ok(None) => {}
            Err(e) => {
                tracing::error!("building the DNS snapshot failed ({e}); still answering from the previous one");
                st.built_from = None;
            }
        }
    }

    /// Swaps `snap` in and updates the metrics.
    fn install(&self, st: &State, snap: Arc<Snapshot>, took: Duration) {
        let m = &self.shared.metrics;
        let f = &m.feed;
        f.snapshot_index.set(snap.index.min(i64::MAX as u64) as i64);
        f.services.set(snap.stats.services as i64);
        f.instances.set(snap.stats.instances as i64);
        f.usable_instances.set(snap.stats.usable as i64);
        f.snapshot_builds.inc();
        f.snapshot_swapped.set(SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64));
        m.snapshot_built(snap.built);
        tracing::debug!(
            index = snap.index,
            services = snap.stats.services,
            instances = snap.stats.instances,
            usable = snap.stats.usable,
            patches = st.patches.len(),
            ms = took.as_millis() as u64,
            "snapshot swapped in"
        );
        if snap.stats.unnamable > 0 {
            tracing::debug!(
                count = snap.stats.unnamable,
                "service names or tags that cannot be a DNS label (dots, over 63 bytes) are not served"
            );
        }
        drop_aside(self.shared.snapshot.swap(snap));
    }
}

/// An instance as the feed knows it: `(node, service id)`.
fn instance_key(e: &Endpoint) -> (String, String) {
    (e.node.clone().unwrap_or_default(), e.service_id.clone().unwrap_or_default())
}

/// Drops `v` on a blocking thread: freeing a snapshot or a full read of 100,000 instances
/// takes tens of milliseconds that the feed loop would otherwise spend before the next
/// change (seen as 100 ms outliers in the freshness benchmark when a full read came in).
fn drop_aside<T: Send + 'static>(v: T) {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => drop(rt.spawn_blocking(move || drop(v))),
        Err(_) => drop(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::tests::zone;

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{}/../discovery/testdata/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    fn inputs(critical: Option<Overlay>, warning: Option<Overlay>) -> Inputs {
        let d = decode_node_dump(&fixture("dump_ui_nodes.json")).unwrap();
        Inputs {
            dump: Arc::new(Read::new(100, 0, d.value).indexed()),
            patches: HashMap::new(),
            critical: critical.map(Arc::new),
            warning: warning.map(Arc::new),
        }
    }

    fn srv(s: &Snapshot, service: &str) -> Vec<String> {
        let mut a = crate::answer::Answer::default();
        let name = hickory_proto::rr::Name::from_ascii(format!("{service}.service.upsync.")).unwrap();
        s.answer(&name, hickory_proto::rr::RecordType::SRV, Default::default(), &mut a);
        let mut v: Vec<String> = a.answers.iter().map(|r| r.data.to_string()).collect();
        v.sort();
        v
    }

    fn check(node: &str, id: &str, name: &str, health: Health) -> CheckState {
        CheckState { node: node.into(), service_id: id.into(), service_name: name.into(), health }
    }

    #[test]
    fn dump_alone_gives_passing_instances_not_down() {
        let s = build(zone(), &inputs(None, None));
        // web1 (passing), web2 (backup, no check); not web3 (down), web4 (critical), web5 (warning).
        assert_eq!(srv(&s, "web"), ["1 3 8080 127-0-0-5.addr.service.upsync.", "2 1 8081 127-0-0-6.addr.service.upsync."]);
        assert!(srv(&s, "cache").is_empty(), "critical node check");
        assert_eq!(s.index, 100);
    }

    #[test]
    fn newer_overlays_win_older_ones_are_ignored() {
        let critical = Overlay::new(120, vec![check("capture-node", "web1", "web", Health::Critical)]);
        let s = build(zone(), &inputs(Some(critical), Some(Overlay::new(120, vec![]))));
        // web1 now critical; web4 recovered; web5 left warning; the node check cleared.
        let web = srv(&s, "web");
        assert!(web.iter().any(|r| r.contains("8083")) && web.iter().any(|r| r.contains("8084")), "{web:?}");
        assert!(!web.iter().any(|r| r.contains("8080")), "{web:?}");
        assert!(!srv(&s, "cache").is_empty());
        assert_eq!(s.index, 120);
        let s = build(zone(), &inputs(Some(Overlay::new(50, vec![])), Some(Overlay::new(50, vec![]))));
        assert_eq!(srv(&s, "web").len(), 2);
    }

    #[test]
    fn patches_replace_their_service_until_the_next_dump() {
        let mut inp = inputs(None, None);
        let web = decode_health_instances(&fixture("dump_health_web.json")).unwrap().value;
        let mut one = web.into_iter().filter(|e| e.service_id.as_deref() == Some("web1")).collect::<Vec<_>>();
        one[0].port = 9999;
        inp.patches.insert("web".into(), Arc::new(Read::new(130, 0, one)));
        inp.patches.insert("cache".into(), Arc::new(Read::new(131, 0, vec![])));
        let s = build(zone(), &inp);
        assert_eq!(srv(&s, "web"), ["1 3 9999 127-0-0-5.addr.service.upsync."]);
        assert!(srv(&s, "cache").is_empty());
        assert_eq!(s.index, 131);
        // An overlay newer than the patch still applies to it.
        inp.critical = Some(Arc::new(Overlay::new(140, vec![check("capture-node", "web1", "web", Health::Critical)])));
        assert!(srv(&build(zone(), &inp), "web").is_empty());
    }

    /// The incremental rebuild of what changed between two sets of inputs gives the same
    /// answers as a full build.
    #[test]
    fn incremental_rebuilds_match_full_builds() {
        let mut inp = inputs(Some(Overlay::new(90, vec![])), Some(Overlay::new(90, vec![])));
        let mut snap = build(zone(), &inp);
        let steps = [
            Overlay::new(120, vec![check("capture-node", "web1", "web", Health::Critical)]),
            Overlay::new(130, vec![check("capture-node", "web1", "web", Health::Critical), check("sick-node", "", "", Health::Critical)]),
            Overlay::new(140, vec![]),
        ];
        for new in steps {
            let before = inp.clone();
            inp.critical = Some(Arc::new(new));
            let names = health_changed(&before, &inp);
            assert!(!names.is_empty());
            let changed = names.iter().map(|n| (n.clone(), service_instances(&inp, n))).collect();
            snap = snap.with_services(inputs_index(&inp), changed);
            let full = build(zone(), &inp);
            for svc in ["web", "cache", "api", "db", "pg"] {
                assert_eq!(srv(&snap, svc), srv(&full, svc), "{svc} at index {}", snap.index);
            }
            assert_eq!(snap.stats, full.stats);
        }
        assert!(health_changed(&inp.clone(), &inp).is_empty());
        // Once the overlays cover the dump, their difference names the same services as the scan.
        inp.warning = Some(Arc::new(Overlay::new(140, vec![])));
        let before = inp.clone();
        inp.critical = Some(Arc::new(Overlay::new(
            150,
            vec![check("capture-node", "web5", "web", Health::Critical), check("sick-node", "", "", Health::Critical)],
        )));
        let mut fast: Vec<String> = health_changed(&before, &inp).into_iter().collect();
        let mut scan: Vec<String> = health_changed_scan(&before, &inp).into_iter().collect();
        fast.sort();
        scan.sort();
        assert_eq!(fast, scan);
        assert_eq!(fast, ["cache", "web"]);
    }

    /// Between two full reads, with the same overlays, only the services whose patch changed
    /// are rebuilt (no pass over every instance), and the result matches a full build.
    #[test]
    fn a_new_patch_alone_names_its_service() {
        let before = inputs(Some(Overlay::new(90, vec![])), None);
        let snap = build(zone(), &before);
        let mut after = before.clone();
        assert!(patches_changed(&before, &after).is_empty() && health_changed(&before, &after).is_empty());
        let web = decode_health_instances(&fixture("dump_health_web.json")).unwrap().value;
        after.patches.insert("web".into(), Arc::new(Read::new(130, 0, web.into_iter().take(1).collect())));
        assert!(health_changed(&before, &after).is_empty(), "same overlays");
        let names = patches_changed(&before, &after);
        assert_eq!(names, HashSet::from(["web".to_string()]));
        let changed = names.iter().map(|n| (n.clone(), service_instances(&after, n))).collect();
        let snap = snap.with_services(inputs_index(&after), changed);
        assert_eq!(srv(&snap, "web"), srv(&build(zone(), &after), "web"));
        // Replacing or dropping a patch names it too.
        let mut later = after.clone();
        later.patches.insert("web".into(), Arc::new(Read::new(131, 0, vec![])));
        assert_eq!(patches_changed(&after, &later), names);
        assert_eq!(patches_changed(&after, &before), names);
    }

    #[test]
    fn instance_counts_that_differ_from_the_snapshot_name_the_services_to_read() {
        // Captured from the same registrations (discovery/testdata/capture-dump.sh).
        let dump = Read::new(10, 0, decode_node_dump(&fixture("dump_ui_nodes.json")).unwrap().value).indexed();
        let counts = upsync_discovery::decode::decode_instance_counts(&fixture("ui_services.json")).unwrap();
        let none = HashMap::new();
        assert!(stale_services(&dump, &none, &counts).is_empty(), "the same catalog: {:?}", stale_services(&dump, &none, &counts));
        let mut changed = counts.clone();
        *changed.get_mut("web").unwrap() += 1;
        changed.remove("db");
        assert_eq!(stale_services(&dump, &none, &changed), ["db", "web"]);
        // A patch is our view of its service: one web instance read alone now.
        let web = dump.by_service["web"][0];
        let patch = Arc::new(Read::new(11, 0, vec![dump.endpoints[web].clone()]));
        let patches = HashMap::from([("web".to_string(), patch)]);
        assert_eq!(stale_services(&dump, &patches, &counts), ["web"]);
        changed.insert("web".into(), 1);
        changed.insert("db".into(), 1);
        assert!(stale_services(&dump, &patches, &changed).is_empty());
    }

    #[test]
    fn nodes_that_moved_or_left_name_their_services() {
        let mut st = State::default();
        let dump = Read::new(10, 0, decode_node_dump(&fixture("dump_ui_nodes.json")).unwrap().value).indexed();
        // A patch holding an instance on ext-node (where db runs in the dump).
        let db = dump.endpoints[dump.by_service["db"][0]].clone();
        st.patches.insert("extra".into(), Arc::new(Read::new(11, 0, vec![db])));
        st.dump = Some(Arc::new(dump));
        let before = upsync_discovery::decode::decode_node_addresses(&fixture("dump_catalog_nodes.json")).unwrap();
        assert!(Feed::on_moved_nodes(&st, &before, &before).is_empty());
        let mut after = before.clone();
        after.insert("ext-node".into(), "10.9.9.9".into());
        after.remove("sick-node");
        after.insert("new-node".into(), "10.9.9.8".into());
        assert_eq!(Feed::on_moved_nodes(&st, &before, &after), ["cache", "db", "extra"]);
    }

    #[test]
    fn diffs_name_the_services_to_patch() {
        let mut st = State::default();
        st.known.insert(("n1".into(), "known".into()));
        let old = Overlay::new(1, vec![check("n1", "known", "a", Health::Critical), check("n1", "new1", "b", Health::Critical)]);
        let new = Overlay::new(2, vec![check("n1", "known", "a", Health::Critical), check("n2", "new2", "c", Health::Critical)]);
        // new1 left the critical set, new2 entered it; neither is known: b and c are read.
        assert_eq!(Feed::unknown_in_diff(&st, Some(&old), &new), ["b", "c"]);
        let list = |v: &[(&str, &[&str])]| {
            v.iter().map(|(k, t)| (k.to_string(), t.iter().map(|s| s.to_string()).collect())).collect::<BTreeMap<_, _>>()
        };
        let before = list(&[("web", &["v1"]), ("api", &[]), ("old", &[])]);
        let after = list(&[("web", &["v1", "v2"]), ("api", &[]), ("new", &[])]);
        assert_eq!(Feed::list_diff(&before, &after), ["new", "web", "old"]);
    }

    /// At most `hot_services` services are watched on their own; the least recently changed
    /// one gives its place up.
    #[tokio::test]
    async fn the_least_recently_changed_hot_service_gives_its_place_up() {
        let mut cfg = FeedConfig {
            consul: Default::default(),
            wait: Duration::from_secs(1),
            resync_interval: Duration::from_secs(1),
            catalog_read_budget: 0.2,
            hot_services: 2,
        };
        // Nothing listens there: the watches just retry until aborted.
        cfg.consul.addresses = vec!["127.0.0.1:1".parse().unwrap()];
        let shared = Arc::new(Shared {
            snapshot: arc_swap::ArcSwap::from_pointee(Snapshot::empty(zone())),
            metrics: crate::metrics::Metrics::new(),
        });
        let feed = Feed::new(cfg, zone(), shared.clone()).unwrap();
        let (tx, _rx) = mpsc::channel(8);
        let mut st = State::default();
        let names = |st: &State| {
            let mut v: Vec<String> = st.hot.keys().cloned().collect();
            v.sort();
            v
        };
        feed.heat(&mut st, &["a".into(), "b".into()], &tx);
        tokio::time::sleep(Duration::from_millis(2)).await;
        feed.heat(&mut st, &["a".into()], &tx);
        feed.heat(&mut st, &["c".into()], &tx);
        assert_eq!(names(&st), ["a", "c"], "b changed least recently");
        assert_eq!(shared.metrics.feed.hot_services.get(), 2);
        // The given-up watch ends after its request under way (here a refused connection and
        // its backoff), then is reaped.
        let start = Instant::now();
        while st.hot_tasks.len() > 2 {
            assert!(start.elapsed() < Duration::from_secs(10), "the given-up watch still runs");
            tokio::time::sleep(Duration::from_millis(20)).await;
            feed.heat(&mut st, &["c".into()], &tx);
        }
        // At most twice `hot_services` watches, counting those finishing: d waits.
        for name in ["d", "e", "f"] {
            feed.heat(&mut st, &[name.into()], &tx);
        }
        assert!(st.hot_tasks.len() <= 4, "{}", st.hot_tasks.len());
    }

    #[test]
    fn spaced_reads_coalesce_and_wait_by_their_cost() {
        let (mut r, mut idle) = (SpacedRead::default(), SpacedRead::default());
        assert!(r.due().is_none(), "nothing wanted");
        r.wanted = true;
        assert!(r.due().is_some_and(|t| t <= tokio::time::Instant::now()), "due at once");
        r.start_beside(&mut idle);
        r.wanted = true;
        assert!(r.due().is_none(), "one in flight: a change meanwhile waits for it");
        // 100 ms at a 20% budget: the next read waits 400 ms.
        r.done(Duration::from_millis(100), 0.2);
        let wait = r.due().unwrap() - tokio::time::Instant::now();
        assert!(wait > Duration::from_millis(350) && wait <= Duration::from_millis(400), "{wait:?}");
        r.start_beside(&mut idle);
        r.failed(Duration::from_secs(1));
        assert!(r.due().unwrap() > tokio::time::Instant::now() + Duration::from_millis(900), "retried after the backoff");
        r.start_beside(&mut idle);
        r.discarded();
        assert!(r.due().is_some_and(|t| t <= tokio::time::Instant::now()), "a discarded answer is read again at once");
    }

    #[test]
    fn a_read_slowed_by_the_other_is_spaced_by_what_it_takes_alone() {
        let (mut counts, mut full) = (SpacedRead::default(), SpacedRead::default());
        let wait = |r: &SpacedRead| r.due().unwrap() - tokio::time::Instant::now();
        counts.start_beside(&mut full);
        counts.done(Duration::from_millis(100), 0.5);
        counts.wanted = true;
        assert!(wait(&counts) > Duration::from_millis(90), "alone: spaced by its own time");
        // A full read starts while the counts are read: the counts take 300 ms, charged as
        // 150 (half: they shared Consul; 100 alone).
        counts.start_beside(&mut full);
        full.start_beside(&mut counts);
        counts.done(Duration::from_millis(300), 0.5);
        counts.wanted = true;
        assert!(wait(&counts) > Duration::from_millis(140) && wait(&counts) <= Duration::from_millis(150), "{:?}", wait(&counts));
        // The full read started beside them too; the next counts read starts beside it.
        full.done(Duration::from_secs(2), 0.5);
        assert!(full.due().is_none() && !full.overlapped);
        full.wanted = true;
        assert!(wait(&full) > Duration::from_millis(1900), "the first full read has no time alone: its own counts");
        full.start_beside(&mut counts);
        counts.start_beside(&mut full);
        // Six times what it took alone (the catalog grew since?): charged half.
        counts.done(Duration::from_millis(600), 0.5);
        counts.wanted = true;
        assert!(wait(&counts) > Duration::from_millis(290) && wait(&counts) <= Duration::from_millis(300), "{:?}", wait(&counts));
    }
}
