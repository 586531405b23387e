//! The Consul feed: keeps the served snapshot in step with Consul with a fixed number of
//! requests whatever the number of services (dns/README.md, "Watch plan"):
//!
//! - two change detectors, blocking queries on `/v1/catalog/services` (wakes on any service
//!   registration, deregistration or update) and `/v1/catalog/nodes` (node address changes);
//!   a new index triggers one full read of the catalog, `/v1/internal/ui/nodes` (every node
//!   with its services and checks). Reads are coalesced: changes that arrive during a read
//!   cause one more read, not one each, and reads are spaced by at least their own duration
//!   so Consul spends at most half its time on us under constant churn;
//! - health overlays, blocking queries on `/v1/health/state/critical` (and `warning` when
//!   only passing instances are served): Consul keeps checks indexed by status, so these are
//!   cheap, wake only when a check enters or leaves that state, and apply without a full read;
//! - a full read every `resync_interval` regardless, as a safety net.
//!
//! A snapshot is rebuilt on a blocking thread and swapped in whole; answering never waits.
//! When Consul fails, the last snapshot keeps being served and the staleness is reported.
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::mpsc;
use upsync_discovery::decode::{decode_check_states, decode_node_dump, CheckState};
use upsync_discovery::{Backoff, Blocking, Client, Consistency, Endpoint};

use crate::config::FeedConfig;
use crate::server::Shared;
use crate::snapshot::{Health, Instance, Snapshot, ZoneConfig};

/// Shortest time between two requests of one detector, so an index that changes
/// continuously cannot make it spin (at most 50 requests a second).
const MIN_REQUEST_GAP: Duration = Duration::from_millis(20);
/// A warning about an unreachable Consul is repeated this often while it lasts.
const STALE_LOG_EVERY: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Services,
    Nodes,
    Critical,
    Warning,
    Catalog,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Services => "catalog-services",
            Kind::Nodes => "catalog-nodes",
            Kind::Critical => "health-critical",
            Kind::Warning => "health-warning",
            Kind::Catalog => "node-dump",
        }
    }
}

/// A full read of the catalog.
struct Dump {
    index: u64,
    endpoints: Vec<Endpoint>,
}

/// A read of the catalog and the epoch it was started in (see `State::epoch`).
struct EpochDump {
    epoch: u64,
    dump: Dump,
}

enum Event {
    /// A detector's index moved (or its first answer): its index and body. `reset`: the
    /// index went backwards (a restarted dev agent, a restored snapshot, a lagging server).
    Changed { kind: Kind, index: u64, body: Bytes, reset: bool },
    /// A request succeeded (Consul is reachable).
    Ok(Kind),
    Failed { kind: Kind, error: String, retry_in: Duration },
    Dumped(EpochDump),
}

/// Blocking-query loop reporting every change of `X-Consul-Index` (the discovery library's
/// `Watch` reports only changes of the decoded value, and the catalog detector's body, the
/// list of service names, stays the same when an instance comes or goes).
async fn detector(client: Client, kind: Kind, path: String, wait: Duration, tx: mpsc::Sender<Event>) {
    let backoff = Backoff::default();
    let mut rng = fastrand::Rng::new();
    let (mut index, mut attempt, mut resync) = (0u64, 0u32, true);
    loop {
        let started = Instant::now();
        let blocking = (!resync && index > 0).then_some(Blocking { index, wait });
        match client.get(&path, blocking).await {
            Ok(resp) => {
                attempt = 0;
                resync = false;
                let changed = resp.index != index || blocking.is_none();
                let reset = index > 1 && resp.index < index;
                // Never block on index 0: Consul would answer at once, forever.
                index = resp.index.max(1);
                let ev = if changed { Event::Changed { kind, index: resp.index, body: resp.body, reset } } else { Event::Ok(kind) };
                if tx.send(ev).await.is_err() {
                    return;
                }
                tokio::time::sleep(MIN_REQUEST_GAP.saturating_sub(started.elapsed())).await;
            }
            Err(e) => {
                attempt = attempt.saturating_add(1);
                resync = true;
                let retry_in = backoff.delay(attempt, &mut rng);
                if tx.send(Event::Failed { kind, error: e.to_string(), retry_in }).await.is_err() {
                    return;
                }
                tokio::time::sleep(retry_in).await;
            }
        }
    }
}

/// Adds `dc` and the consistency mode to a path the client does not add them to.
fn internal_path(path: &str, cfg: &FeedConfig) -> String {
    let mut params = Vec::new();
    if let Some(dc) = &cfg.consul.datacenter {
        params.push(format!("dc={dc}"));
    }
    match cfg.consul.consistency {
        Consistency::Default => {}
        Consistency::Stale => params.push("stale".into()),
        Consistency::Consistent => params.push("consistent".into()),
    }
    if params.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", params.join("&"))
    }
}

/// One full read of the catalog, decoded off the runtime's threads.
async fn read_catalog(client: Client, path: String, metrics: Arc<crate::metrics::Metrics>) -> Result<Dump, String> {
    let started = Instant::now();
    let resp = client.get(&path, None).await.map_err(|e| e.to_string())?;
    let bytes = resp.body.len();
    let decoded = tokio::task::spawn_blocking(move || decode_node_dump(&resp.body))
        .await
        .map_err(|e| format!("decoding the node dump: {e}"))?
        .map_err(|e| format!("{} answered {path} with {e}", resp.address))?;
    for s in decoded.skipped.iter().take(20) {
        tracing::warn!(instance = %s.key, "instance left out of DNS: {}", s.reason);
    }
    let took = started.elapsed();
    let f = &metrics.feed;
    f.catalog_reads.inc();
    f.catalog_read_seconds.set(took.as_secs_f64());
    f.catalog_read_bytes.set(bytes as i64);
    tracing::debug!(index = resp.index, bytes, instances = decoded.value.len(), ms = took.as_millis() as u64, "read the catalog");
    Ok(Dump { index: resp.index, endpoints: decoded.value })
}

/// Non-passing checks of one state, from `/v1/health/state/<state>`.
struct Overlay {
    index: u64,
    /// `(node, service id)` of service checks in that state.
    services: HashSet<(String, String)>,
    /// Nodes with a node-level check in that state.
    nodes: HashSet<String>,
}

impl Overlay {
    fn new(index: u64, checks: Vec<CheckState>) -> Overlay {
        let mut o = Overlay { index, services: HashSet::new(), nodes: HashSet::new() };
        for c in checks {
            if c.service_id.is_empty() {
                o.nodes.insert(c.node);
            } else {
                o.services.insert((c.node, c.service_id));
            }
        }
        o
    }

    fn covers(&self, node: &str, service_id: &str) -> bool {
        self.nodes.contains(node) || self.services.contains(&(node.to_string(), service_id.to_string()))
    }
}

/// Health of `e`: from the overlays that are newer than the dump, else from the dump.
fn health(e: &Endpoint, dump_index: u64, critical: Option<&Overlay>, warning: Option<&Overlay>) -> Health {
    let (node, id) = (e.node.as_deref().unwrap_or(""), e.service_id.as_deref().unwrap_or(""));
    let state = |o: Option<&Overlay>, h: Health| match o.filter(|o| o.index >= dump_index) {
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

/// Builds the snapshot the dump and overlays describe.
fn build(zone: Arc<ZoneConfig>, dump: &Dump, critical: Option<&Overlay>, warning: Option<&Overlay>) -> Snapshot {
    let instances = dump.endpoints.iter().map(|e| instance(e, health(e, dump.index, critical, warning))).collect();
    let index = [Some(dump.index), critical.map(|o| o.index), warning.map(|o| o.index)].into_iter().flatten().max().unwrap_or(0);
    Snapshot::build(index, zone, instances)
}

/// The feed's state machine.
pub struct Feed {
    cfg: FeedConfig,
    zone: Arc<ZoneConfig>,
    shared: Arc<Shared>,
    client: Client,
}

#[derive(Default)]
struct State {
    dump: Option<Arc<Dump>>,
    critical: Option<Arc<Overlay>>,
    warning: Option<Arc<Overlay>>,
    /// A catalog read is needed (a detector saw a change the dump does not have).
    read_wanted: bool,
    reading: bool,
    /// Incremented when Consul's index goes backwards: reads started before belong to the
    /// old data and are discarded, and the overlays are dropped (the next read carries the
    /// check states anyway).
    epoch: u64,
    next_read: Option<tokio::time::Instant>,
    /// Detectors whose last request failed, with the error.
    failing: Vec<(Kind, String)>,
    stale_logged: Option<Instant>,
    last_ok: Option<Instant>,
}

impl Feed {
    pub fn new(cfg: FeedConfig, zone: Arc<ZoneConfig>, shared: Arc<Shared>) -> anyhow::Result<Feed> {
        let client = Client::new(cfg.consul.clone()).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Feed { cfg, zone, shared, client })
    }

    /// Runs until the task is dropped.
    pub async fn run(self) {
        let (tx, mut rx) = mpsc::channel(64);
        let mut detectors = vec![(Kind::Services, "/v1/catalog/services"), (Kind::Nodes, "/v1/catalog/nodes"), (Kind::Critical, "/v1/health/state/critical")];
        if self.zone.only_passing {
            detectors.push((Kind::Warning, "/v1/health/state/warning"));
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (kind, path) in detectors {
            tasks.spawn(detector(self.client.clone(), kind, path.to_string(), self.cfg.wait, tx.clone()));
        }
        let dump_path = internal_path("/v1/internal/ui/nodes", &self.cfg);
        let mut st = State::default();
        let mut resync = tokio::time::interval(self.cfg.resync_interval);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resync.tick().await;
        let mut stale_tick = tokio::time::interval(STALE_LOG_EVERY);
        stale_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let read_due = st.read_wanted && !st.reading;
            let next_read = st.next_read.unwrap_or_else(tokio::time::Instant::now);
            tokio::select! {
                ev = rx.recv() => {
                    let Some(ev) = ev else { return };
                    let mut dirty = self.on_event(&mut st, ev);
                    // Coalesce what queued up meanwhile into one rebuild.
                    while let Ok(ev) = rx.try_recv() {
                        dirty |= self.on_event(&mut st, ev);
                    }
                    if dirty {
                        self.rebuild(&st).await;
                    }
                }
                _ = tokio::time::sleep_until(next_read), if read_due => {
                    st.reading = true;
                    st.read_wanted = false;
                    let (client, path, tx, metrics, epoch) = (self.client.clone(), dump_path.clone(), tx.clone(), self.shared.metrics.clone(), st.epoch);
                    tokio::spawn(async move {
                        let started = Instant::now();
                        let ev = match read_catalog(client, path, metrics).await {
                            Ok(dump) => Event::Dumped(EpochDump { epoch, dump }),
                            Err(error) => Event::Failed { kind: Kind::Catalog, error, retry_in: Duration::ZERO },
                        };
                        tracing::trace!(ms = started.elapsed().as_millis() as u64, "catalog read done");
                        let _ = tx.send(ev).await;
                    });
                    st.next_read = None;
                }
                _ = resync.tick() => {
                    // A read even without a change (only once a first one was wanted).
                    st.read_wanted |= st.dump.is_some();
                }
                _ = stale_tick.tick() => self.log_stale(&mut st, false),
            }
        }
    }

    /// Applies one event; whether the snapshot must be rebuilt.
    fn on_event(&self, st: &mut State, ev: Event) -> bool {
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
                ok(st, kind);
                if reset {
                    tracing::info!(watch = kind.name(), index, "Consul's index went backwards (restarted or restored?); reading the catalog afresh");
                    st.epoch += 1;
                    st.critical = None;
                    st.warning = None;
                    st.read_wanted = true;
                }
                match kind {
                    Kind::Services | Kind::Nodes => {
                        st.read_wanted |= st.dump.as_ref().is_none_or(|d| index > d.index);
                        false
                    }
                    Kind::Critical | Kind::Warning => match decode_check_states(&body) {
                        Ok(checks) => {
                            let o = Some(Arc::new(Overlay::new(index, checks)));
                            if kind == Kind::Critical {
                                st.critical = o;
                            } else {
                                st.warning = o;
                            }
                            st.dump.is_some()
                        }
                        Err(e) => {
                            self.failed(st, kind, format!("decoding /v1/health/state: {e}"));
                            false
                        }
                    },
                    Kind::Catalog => false,
                }
            }
            Event::Failed { kind, error, retry_in } => {
                if kind == Kind::Catalog {
                    st.reading = false;
                    st.read_wanted = true;
                    st.next_read = Some(tokio::time::Instant::now() + Duration::from_secs(1));
                }
                tracing::debug!(watch = kind.name(), ?retry_in, "Consul request failed: {error}");
                self.failed(st, kind, error);
                false
            }
            Event::Dumped(EpochDump { epoch, dump: d }) => {
                ok(st, Kind::Catalog);
                let took = Duration::from_secs_f64(m.feed.catalog_read_seconds.get().max(0.0));
                st.reading = false;
                if epoch != st.epoch {
                    st.read_wanted = true;
                    return false;
                }
                // Space reads by their own duration: at most half of Consul's time for us.
                st.next_read = Some(tokio::time::Instant::now() + took);
                if st.dump.is_none() {
                    tracing::info!(index = d.index, instances = d.endpoints.len(), ms = took.as_millis() as u64, "first read of the Consul catalog");
                }
                st.dump = Some(Arc::new(d));
                true
            }
        }
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

    /// Builds the snapshot off the runtime and swaps it in.
    async fn rebuild(&self, st: &State) {
        let Some(dump) = st.dump.clone() else { return };
        let (zone, critical, warning) = (self.zone.clone(), st.critical.clone(), st.warning.clone());
        let started = Instant::now();
        let built = tokio::task::spawn_blocking(move || build(zone, &dump, critical.as_deref(), warning.as_deref())).await;
        let snap = match built {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("building the DNS snapshot failed ({e}); still answering from the previous one");
                return;
            }
        };
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
            ms = started.elapsed().as_millis() as u64,
            "snapshot swapped in"
        );
        if snap.stats.unnamable > 0 {
            tracing::debug!(count = snap.stats.unnamable, "service names or tags that cannot be a DNS label (dots, over 63 bytes) are not served");
        }
        self.shared.snapshot.store(Arc::new(snap));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::tests::zone;

    fn dump() -> Dump {
        let body = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../discovery/testdata/dump_ui_nodes.json")).unwrap();
        let d = decode_node_dump(&body).unwrap();
        Dump { index: 100, endpoints: d.value }
    }

    fn usable(s: &Snapshot, service: &str) -> Vec<String> {
        let mut a = crate::answer::Answer::default();
        let name = hickory_proto::rr::Name::from_ascii(format!("{service}.service.upsync.")).unwrap();
        s.answer(&name, hickory_proto::rr::RecordType::SRV, Default::default(), &mut a);
        let mut ports: Vec<String> = a.answers.iter().map(|r| r.data.to_string()).collect();
        ports.sort();
        ports
    }

    #[test]
    fn dump_alone_gives_passing_instances_not_down() {
        let s = build(zone(), &dump(), None, None);
        // web1 (passing), web2 (backup, no check); not web3 (down), web4 (critical), web5 (warning).
        assert_eq!(usable(&s, "web"), ["1 3 8080 127-0-0-5.addr.service.upsync.", "2 1 8081 127-0-0-6.addr.service.upsync."]);
        assert!(usable(&s, "cache").is_empty(), "critical node check");
        assert_eq!(s.index, 100);
    }

    #[test]
    fn newer_overlays_win_older_ones_are_ignored() {
        let d = dump();
        let critical = Overlay::new(120, vec![CheckState { node: "capture-node".into(), service_id: "web1".into(), health: Health::Critical }]);
        let warning = Overlay::new(120, vec![]);
        let s = build(zone(), &d, Some(&critical), Some(&warning));
        // web1 now critical; web4 recovered; web5 left warning.
        let web = usable(&s, "web");
        assert!(web.iter().any(|r| r.contains("8083")) && web.iter().any(|r| r.contains("8084")), "{web:?}");
        assert!(!web.iter().any(|r| r.contains("8080")), "{web:?}");
        assert!(!usable(&s, "cache").is_empty(), "node check no longer critical");
        assert_eq!(s.index, 120);
        let old = Overlay::new(50, vec![]);
        let s = build(zone(), &d, Some(&old), Some(&old));
        assert_eq!(usable(&s, "web").len(), 2);
    }

    #[test]
    fn internal_paths_carry_dc_and_consistency() {
        let mut cfg = FeedConfig { consul: Default::default(), wait: Duration::from_secs(1), resync_interval: Duration::from_secs(1) };
        assert_eq!(internal_path("/v1/internal/ui/nodes", &cfg), "/v1/internal/ui/nodes");
        cfg.consul.datacenter = Some("dc2".into());
        cfg.consul.consistency = Consistency::Stale;
        assert_eq!(internal_path("/v1/internal/ui/nodes", &cfg), "/v1/internal/ui/nodes?dc=dc2&stale");
    }
}
