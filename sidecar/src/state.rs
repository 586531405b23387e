//! The sidecar's desired state and its queue of changes for Consul.
//!
//! Inputs (the engine watcher, the scheduler API, drain timers, reconciling) change the
//! desired endpoints under one lock and put the ids they touched in a FIFO queue; the applier
//! takes ids from the queue and makes Consul match the desired state of each id at that
//! moment. Changes to one id are coalesced (a container started and stopped while Consul was
//! down is never registered), ids keep their queue order across retries, and the applier
//! knows what Consul holds ([`Written`]) so nothing is sent twice.
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::Settings;
use crate::container::{ContainerInfo, HealthState, RunState};
use crate::journal::{Intent, Journal};
use crate::mapping::Mapped;
use crate::model::{EndpointSpec, Source};
use crate::target::{target, DownReason, Record, Target};

/// What the applier knows Consul holds for one endpoint id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Written {
    pub service: Option<WrittenService>,
    pub kv: Option<WrittenKv>,
    /// (key, value) of the ownership record.
    pub record: Option<(String, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenService {
    pub hash: String,
    pub maintenance: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenKv {
    pub key: String,
    pub value: String,
    /// ModifyIndex of our write (0 when unknown): deletes are CAS'd on it, so an entry
    /// someone else rewrote is left alone.
    pub index: u64,
}

impl Written {
    pub fn service_matches(&self, t: &Target) -> bool {
        match (&self.service, &t.service) {
            (None, None) => true,
            (Some(w), Some(t)) => w.hash == t.hash && w.maintenance == t.maintenance.is_some(),
            _ => false,
        }
    }

    pub fn kv_matches(&self, t: &Target) -> bool {
        match (&self.kv, &t.kv) {
            (None, None) => true,
            (Some(w), Some((k, v))) => &w.key == k && &w.value == v,
            _ => false,
        }
    }

    pub fn matches(&self, t: &Target) -> bool {
        self.service_matches(t) && self.kv_matches(t) && self.record == t.record
    }

    pub fn is_empty(&self) -> bool {
        self.service.is_none() && self.kv.is_none() && self.record.is_none()
    }
}

#[derive(Clone, Debug)]
pub struct Drain {
    pub until: Instant,
    pub gen: u64,
}

/// A desired endpoint.
#[derive(Clone, Debug)]
pub struct Entry {
    pub spec: EndpointSpec,
    /// Marked down because of its container (paused, health check not passing).
    pub held: Option<DownReason>,
    pub drain: Option<Drain>,
}

impl Entry {
    fn new(spec: EndpointSpec) -> Entry {
        Entry { spec, held: None, drain: None }
    }

    pub fn down_reason(&self) -> Option<DownReason> {
        if self.drain.is_some() {
            Some(DownReason::Draining)
        } else {
            self.held.clone()
        }
    }
}

#[derive(Clone, Debug)]
struct ContainerRec {
    info: ContainerInfo,
    ids: Vec<String>,
    draining_since: Option<Instant>,
}

/// Whether this sidecar holds its node's lock (see [`crate::lock`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(tag = "state", content = "error", rename_all = "lowercase")]
pub enum LockState {
    /// Not acquired yet (Consul not asked yet, or unreachable).
    #[default]
    Waiting,
    Held,
    /// Another sidecar with this node id holds it.
    Conflict(String),
    /// The Consul token may not create sessions or write the lock key: the sidecar works
    /// without the lock (as before it had one), and says so.
    Unavailable(String),
}

/// Health of the two connections, for `/healthz` and the logs.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    pub lock: LockState,
    /// Ownership records found invalid at the last reconcile (reported, never acted on).
    pub invalid_records: Vec<String>,
    pub consul_reachable: bool,
    pub consul_error: Option<String>,
    /// Failed Consul requests since the start (`upsync_sidecar_consul_errors_total`).
    #[serde(skip)]
    pub consul_errors: u64,
    pub engine_connected: bool,
    pub engine_error: Option<String>,
    /// Seconds since the last complete reconcile.
    #[serde(skip)]
    pub last_reconcile: Option<Instant>,
}

#[derive(Default)]
pub struct State {
    entries: BTreeMap<String, Entry>,
    containers: HashMap<String, ContainerRec>,
    queue: VecDeque<String>,
    queued: HashSet<String>,
    written: HashMap<String, Written>,
    /// Last error of an id Consul refused (not a transient one), shown by the API.
    failed: HashMap<String, String>,
    /// The API's endpoints were read back from Consul (after a restart).
    api_loaded: bool,
    /// API ids PUT or DELETEd before that: their records must not override the call.
    api_touched: HashSet<String>,
    /// The engine's containers were listed at least once.
    engine_synced: bool,
    reconcile_requested: bool,
    next_gen: u64,
    /// API calls answered but not yet held by Consul (recorded on disk), and the version of
    /// this set (bumped at every change).
    pending_calls: BTreeMap<String, Intent>,
    pending_version: u64,
    pub status: Status,
}

impl State {
    fn record_call(&mut self, id: &str, intent: Intent) {
        self.pending_calls.insert(id.to_string(), intent);
        self.pending_version += 1;
    }
}

/// Outcome of `PUT /v1/endpoints/...`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    Created,
    Updated,
    Unchanged,
}

/// A conflicting `PUT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub field: &'static str,
    pub reason: String,
}

/// Outcome of `DELETE /v1/endpoints/...`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeleteOutcome {
    Deleted,
    Draining {
        until: Duration,
    },
    NotFound,
    /// The id belongs to a container (or another service).
    Conflict(Conflict),
}

/// One endpoint as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct EndpointView {
    #[serde(flatten)]
    pub spec: EndpointSpec,
    /// `active`, `draining`, `paused`, `starting` (health check not passed yet), `unhealthy` or `down`.
    pub state: &'static str,
    /// Consul holds exactly what is desired.
    pub synced: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The state, its lock and the applier's wake-up.
pub struct Shared {
    pub settings: Arc<Settings>,
    state: Mutex<State>,
    wake: Notify,
    journal: Option<Journal>,
}

impl Shared {
    /// Without a journal: API calls are kept in memory only (unit tests).
    pub fn new(settings: Arc<Settings>) -> Arc<Shared> {
        Arc::new(Shared { settings, state: Mutex::new(State::default()), wake: Notify::new(), journal: None })
    }

    /// With the journal of API calls, and the calls it held at start applied as if they had
    /// just been made (before Consul's records are read, so they win over them).
    pub fn with_journal(settings: Arc<Settings>, journal: Journal, pending: BTreeMap<String, Intent>) -> Arc<Shared> {
        let mut st = State::default();
        let (mut puts, mut deletes) = (0, 0);
        for (id, intent) in &pending {
            st.api_touched.insert(id.clone());
            match intent {
                Intent::Put { spec } => {
                    puts += 1;
                    st.entries.insert(id.clone(), Entry::new(spec.as_ref().clone()));
                }
                Intent::Delete { .. } => deletes += 1,
            }
            enqueue(&mut st, id);
        }
        if !pending.is_empty() {
            tracing::info!(puts, deletes, file = %journal.path().display(), "API calls recorded before the restart and not yet in Consul; applying them");
        }
        st.pending_calls = pending;
        Arc::new(Shared { settings, state: Mutex::new(st), wake: Notify::new(), journal: Some(journal) })
    }

    /// Writes the pending API calls to disk (blocking: fsync) if they changed since the last
    /// write. An error names the file.
    pub fn persist_calls(&self) -> Result<(), String> {
        let Some(j) = &self.journal else { return Ok(()) };
        j.persist(|| {
            let st = self.lock();
            (st.pending_version, st.pending_calls.clone())
        })
    }

    /// Whether pending API calls changed since they were last written (cheap; the applier
    /// then writes them off its thread).
    pub fn calls_changed(&self) -> bool {
        let Some(j) = &self.journal else { return false };
        let written = j.written_version();
        self.lock().pending_version > written
    }

    /// Drops the pending call of `id` once Consul holds what it asked for.
    fn settle(&self, st: &mut State, id: &str) {
        if !st.pending_calls.contains_key(id) {
            return;
        }
        let t = self.target_in(st, id);
        let held = st.written.get(id).map_or(t == Target::default(), |w| w.matches(&t));
        if held {
            st.pending_calls.remove(id);
            st.pending_version += 1;
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until there is something for the applier (a queued id or a reconcile request).
    pub async fn wait_for_work(&self) {
        self.wake.notified().await
    }

    pub fn wake_applier(&self) {
        self.wake.notify_one();
    }

    /// Asks the applier to reconcile soon (after a Consul outage, when the engine synced...).
    pub fn request_reconcile(&self) {
        self.lock().reconcile_requested = true;
        self.wake_applier();
    }

    fn target_in(&self, st: &State, id: &str) -> Target {
        match st.entries.get(id) {
            Some(e) => target(&e.spec, e.down_reason(), &self.settings),
            None => Target::default(),
        }
    }

    /// The next queued id, its target and what Consul holds for it.
    pub fn next_change(&self) -> Option<(String, Target, Written)> {
        let mut st = self.lock();
        while let Some(id) = st.queue.pop_front() {
            st.queued.remove(&id);
            let t = self.target_in(&st, &id);
            let w = st.written.get(&id).cloned().unwrap_or_default();
            if !w.matches(&t) {
                return Some((id, t, w));
            }
        }
        None
    }

    pub fn queue_len(&self) -> usize {
        self.lock().queue.len()
    }

    /// The applier wrote `w` for `id` (success, or partial progress before an error).
    pub fn set_written(&self, id: &str, w: Written) {
        let mut st = self.lock();
        if w.is_empty() {
            st.written.remove(id);
        } else {
            st.written.insert(id.to_string(), w);
        }
        self.settle(&mut st, id);
    }

    /// The change of `id` failed transiently: it goes back to the head of the queue.
    pub fn retry_first(&self, id: String) {
        let mut st = self.lock();
        if st.queued.insert(id.clone()) {
            st.queue.push_front(id);
        }
    }

    /// Consul refused the change of `id` for now: it is queued again (at the back) after
    /// `delay`, while the other ids go on.
    pub fn retry_later(self: &Arc<Self>, id: String, delay: Duration) {
        let shared = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let mut st = shared.lock();
            enqueue(&mut st, &id);
            drop(st);
            shared.wake_applier();
        });
    }

    /// Consul refused the change of `id` for good (bad registration, ACL): kept out of the
    /// queue until the next reconcile, error shown by the API.
    pub fn set_failed(&self, id: &str, error: Option<String>) {
        let mut st = self.lock();
        match error {
            Some(e) => {
                st.failed.insert(id.to_string(), e);
            }
            None => {
                st.failed.remove(id);
            }
        }
    }

    pub fn take_reconcile_request(&self) -> bool {
        std::mem::take(&mut self.lock().reconcile_requested)
    }

    // ----- container events ----------------------------------------------------------------

    /// A container runs (or is paused) with these endpoints.
    pub fn container_up(&self, info: ContainerInfo, mapped: Mapped) {
        let mut st = self.lock();
        let cid = info.id.clone();
        if let Some(rec) = st.containers.get_mut(&cid) {
            if let Some(since) = rec.draining_since {
                // Docker reports a stopping container as running until it exits; only a stop
                // that took much longer than it may is taken as aborted.
                if since.elapsed() < info.stop_timeout + self.settings.drain + Duration::from_secs(5) {
                    return;
                }
                tracing::info!(container = %info.name, "container still running long after it was stopped; registering it again");
                rec.draining_since = None;
            }
        }
        let held = if info.state == RunState::Paused {
            Some(DownReason::Paused)
        } else {
            match info.health {
                Some(HealthState::Starting) => Some(DownReason::HealthStarting),
                Some(HealthState::Unhealthy) => Some(DownReason::Unhealthy),
                Some(HealthState::Healthy) | None => None,
            }
        };
        let mut ids = Vec::new();
        for spec in mapped.endpoints {
            if let Some(e) = st.entries.get(&spec.id) {
                if e.spec.container_id() != Some(cid.as_str()) {
                    tracing::warn!(
                        id = %spec.id, container = %info.name,
                        "endpoint id {} is already used by {}; container port not registered (set SERVICE_ID)",
                        spec.id, describe_source(&e.spec.source)
                    );
                    continue;
                }
            }
            ids.push(spec.id.clone());
            upsert(&mut st, spec, held.clone());
        }
        let old = st.containers.get(&cid).map(|r| r.ids.clone()).unwrap_or_default();
        for id in old.iter().filter(|id| !ids.contains(id)) {
            remove(&mut st, id);
        }
        let draining_since = st.containers.get(&cid).and_then(|r| r.draining_since);
        st.containers.insert(cid, ContainerRec { info, ids, draining_since });
        drop(st);
        self.wake_applier();
    }

    /// A container stopped (died, was removed): its endpoints go at once.
    pub fn container_gone(&self, cid: &str) {
        let mut st = self.lock();
        if let Some(rec) = st.containers.remove(cid) {
            for id in &rec.ids {
                remove(&mut st, id);
            }
            if !rec.ids.is_empty() {
                tracing::info!(container = %rec.info.name, endpoints = rec.ids.len(), "container stopped; deregistering");
            }
        }
        drop(st);
        self.wake_applier();
    }

    /// A container is being stopped: mark its endpoints down now, remove them after the drain
    /// period (never longer than the container's stop timeout) or when it exits.
    pub fn container_stopping(self: &Arc<Self>, cid: &str) {
        let mut st = self.lock();
        let Some(rec) = st.containers.get_mut(cid) else { return };
        if rec.draining_since.is_some() {
            return;
        }
        rec.draining_since = Some(Instant::now());
        let period = self.settings.drain.min(rec.info.stop_timeout);
        let (ids, name) = (rec.ids.clone(), rec.info.name.clone());
        if !ids.is_empty() {
            tracing::info!(container = %name, endpoints = ids.len(), drain = ?period, "container stopping; draining");
        }
        let timers: Vec<_> = ids.iter().filter_map(|id| start_drain(&mut st, id, period)).collect();
        drop(st);
        self.spawn_drain_timers(timers, period);
        self.wake_applier();
    }

    /// A container got a signal (Docker's `kill` event): a stop signal starts the drain.
    pub fn container_signalled(self: &Arc<Self>, cid: &str, signal: &str) {
        let stops = self.lock().containers.get(cid).is_some_and(|r| r.info.is_stop_signal(signal));
        if stops {
            self.container_stopping(cid);
        }
    }

    /// The endpoint ids registered for a container.
    pub fn container_endpoint_ids(&self, cid: &str) -> Vec<String> {
        self.lock().containers.get(cid).map(|r| r.ids.clone()).unwrap_or_default()
    }

    /// The ids of the known containers and whether each is being drained.
    pub fn known_containers(&self) -> Vec<(String, bool)> {
        self.lock().containers.iter().map(|(id, r)| (id.clone(), r.draining_since.is_some())).collect()
    }

    /// The engine's list of containers was read completely (once is enough to trust it).
    pub fn engine_synced(&self) {
        let first = {
            let mut st = self.lock();
            !std::mem::replace(&mut st.engine_synced, true)
        };
        if first {
            self.request_reconcile();
        }
    }

    pub fn set_engine_status(&self, connected: bool, error: Option<String>) {
        let mut st = self.lock();
        st.status.engine_connected = connected;
        st.status.engine_error = error;
    }

    // ----- scheduler API -----------------------------------------------------------------

    /// `PUT`: creates or replaces an API endpoint.
    pub fn api_put(&self, spec: EndpointSpec) -> Result<PutOutcome, Conflict> {
        let mut st = self.lock();
        if let Some(e) = st.entries.get(&spec.id) {
            if e.spec.source != Source::Api {
                return Err(Conflict {
                    field: "id",
                    reason: format!("`{}` is {}; it cannot be changed through the API", spec.id, describe_source(&e.spec.source)),
                });
            }
            if e.spec.service != spec.service {
                return Err(Conflict {
                    field: "id",
                    reason: format!("`{}` is already an endpoint of service `{}`; ids are unique on a node", spec.id, e.spec.service),
                });
            }
        }
        if let Some(key) = spec.kv_key("") {
            if let Some(other) = st.entries.values().find(|e| e.spec.id != spec.id && e.spec.kv_key("").as_ref() == Some(&key)) {
                return Err(Conflict {
                    field: "address",
                    reason: format!(
                        "{} of service `{}` is already registered on this node as `{}`",
                        spec.addr(),
                        spec.service,
                        other.spec.id
                    ),
                });
            }
        }
        st.api_touched.insert(spec.id.clone());
        let outcome = match st.entries.get(&spec.id) {
            None => PutOutcome::Created,
            Some(e) if e.spec == spec && e.drain.is_none() => PutOutcome::Unchanged,
            Some(_) => PutOutcome::Updated,
        };
        if outcome != PutOutcome::Unchanged {
            tracing::info!(service = %spec.service, id = %spec.id, addr = %spec.addr(), "API: endpoint {}", if outcome == PutOutcome::Created { "created" } else { "updated" });
            st.record_call(&spec.id, Intent::Put { spec: Box::new(spec.clone()) });
            upsert(&mut st, spec, None);
            drop(st);
            self.wake_applier();
        }
        Ok(outcome)
    }

    /// `DELETE`: removes an API endpoint at once, or drains it first.
    pub fn api_delete(self: &Arc<Self>, service: &str, id: &str, drain: Option<Duration>) -> DeleteOutcome {
        let mut st = self.lock();
        let Some(e) = st.entries.get(id) else {
            st.api_touched.insert(id.to_string());
            if !st.api_loaded {
                // Consul's records were not read yet: it may exist there, and must go.
                st.record_call(id, Intent::Delete { service: service.to_string() });
            }
            return DeleteOutcome::NotFound;
        };
        if e.spec.source != Source::Api || e.spec.service != service {
            let what = if e.spec.service != service {
                format!("`{id}` is an endpoint of service `{}`, not `{service}`", e.spec.service)
            } else {
                format!("`{id}` is {}; stop the container (it is drained) or label it SERVICE_IGNORE", describe_source(&e.spec.source))
            };
            return DeleteOutcome::Conflict(Conflict { field: "id", reason: what });
        }
        let draining_until = e.drain.as_ref().map(|d| d.until);
        st.api_touched.insert(id.to_string());
        st.record_call(id, Intent::Delete { service: service.to_string() });
        match drain.filter(|d| !d.is_zero()) {
            None => {
                tracing::info!(service, id, "API: endpoint deleted");
                remove(&mut st, id);
                drop(st);
                self.wake_applier();
                DeleteOutcome::Deleted
            }
            Some(period) => {
                if let Some(until) = draining_until {
                    return DeleteOutcome::Draining { until: until.saturating_duration_since(Instant::now()) };
                }
                tracing::info!(service, id, drain = ?period, "API: endpoint draining before deletion");
                let timer = start_drain(&mut st, id, period);
                drop(st);
                self.spawn_drain_timers(timer.into_iter().collect(), period);
                self.wake_applier();
                DeleteOutcome::Draining { until: period }
            }
        }
    }

    /// The endpoints of this node, optionally of one service.
    pub fn list(&self, service: Option<&str>) -> Vec<EndpointView> {
        let st = self.lock();
        st.entries
            .values()
            .filter(|e| service.is_none_or(|s| e.spec.service == s))
            .map(|e| {
                let t = target(&e.spec, e.down_reason(), &self.settings);
                let synced = st.written.get(&e.spec.id).is_some_and(|w| w.matches(&t));
                EndpointView {
                    state: match e.down_reason() {
                        Some(DownReason::Draining) => "draining",
                        Some(DownReason::Paused) => "paused",
                        Some(DownReason::HealthStarting) => "starting",
                        Some(DownReason::Unhealthy) => "unhealthy",
                        _ if e.spec.down => "down",
                        _ => "active",
                    },
                    synced,
                    kv_key: t.kv.map(|(k, _)| k),
                    error: st.failed.get(&e.spec.id).cloned(),
                    spec: e.spec.clone(),
                }
            })
            .collect()
    }

    pub fn status(&self) -> (Status, usize, usize) {
        let st = self.lock();
        (st.status.clone(), st.queue.len(), st.entries.len())
    }

    /// Sets the lock state; `true` when it changed. The applier is woken (and reconciles
    /// first) when the lock is taken.
    pub fn set_lock(&self, lock: LockState) -> bool {
        let mut st = self.lock();
        if st.status.lock == lock {
            return false;
        }
        let held = lock == LockState::Held;
        st.status.lock = lock;
        if held {
            st.reconcile_requested = true;
        }
        drop(st);
        self.wake_applier();
        true
    }

    /// Whether the applier may write: the lock is held, or cannot be had at all (token).
    pub fn lock_held(&self) -> bool {
        matches!(self.lock().status.lock, LockState::Held | LockState::Unavailable(_))
    }

    pub fn set_invalid_records(&self, records: Vec<String>) {
        self.lock().status.invalid_records = records;
    }

    pub fn set_consul_status(&self, reachable: bool, error: Option<String>) {
        let mut st = self.lock();
        st.status.consul_reachable = reachable;
        st.status.consul_error = error;
        if !reachable {
            st.status.consul_errors += 1;
        }
    }

    // ----- drains ------------------------------------------------------------------------

    fn spawn_drain_timers(self: &Arc<Self>, timers: Vec<(String, u64)>, period: Duration) {
        for (id, gen) in timers {
            let shared = Arc::clone(self);
            tokio::spawn(async move {
                tokio::time::sleep(period).await;
                shared.drain_expired(&id, gen);
            });
        }
    }

    fn drain_expired(&self, id: &str, gen: u64) {
        let mut st = self.lock();
        if st.entries.get(id).and_then(|e| e.drain.as_ref()).is_some_and(|d| d.gen == gen) {
            tracing::info!(id, "drain period over; deregistering");
            remove(&mut st, id);
            drop(st);
            self.wake_applier();
        }
    }

    // ----- reconciling ---------------------------------------------------------------------

    /// Takes what Consul holds for this node (`reality`: id → what is written, with the
    /// ownership record when there is one) as the applier's knowledge, loads the API's
    /// endpoints after a restart, and queues every id whose target differs. Container
    /// endpoints are only removed once the engine has been listed.
    pub fn reconcile(self: &Arc<Self>, reality: HashMap<String, (Written, Option<Record>)>) -> usize {
        let mut st = self.lock();
        if !st.api_loaded {
            let mut loaded = 0;
            for (id, (_, rec)) in &reality {
                let Some(rec) = rec else { continue };
                if rec.spec.source != Source::Api || st.api_touched.contains(id) || st.entries.contains_key(id) {
                    continue;
                }
                // An endpoint that was draining when the sidecar stopped is removed now.
                if !rec.draining {
                    st.entries.insert(id.clone(), Entry::new(rec.spec.clone()));
                    loaded += 1;
                }
            }
            st.api_loaded = true;
            if loaded > 0 {
                tracing::info!(endpoints = loaded, "loaded the API's endpoints from Consul");
            }
        }
        let engine_synced = st.engine_synced;
        let mut ids: HashSet<String> = reality.keys().cloned().collect();
        ids.extend(st.entries.keys().cloned());
        ids.extend(st.written.keys().cloned());
        let mut queued = 0;
        for id in ids {
            let (w, rec) = reality.get(&id).cloned().unwrap_or_default();
            let is_container = rec.as_ref().is_some_and(|r| r.spec.container_id().is_some());
            if !engine_synced && is_container && !st.entries.contains_key(&id) {
                // Not listed yet: it may well be running. Keep it, and know where it is.
                st.written.insert(id, w);
                continue;
            }
            let t = self.target_in(&st, &id);
            if w.is_empty() {
                st.written.remove(&id);
            } else {
                st.written.insert(id.clone(), w.clone());
            }
            st.failed.remove(&id);
            if !w.matches(&t) && st.queued.insert(id.clone()) {
                st.queue.push_back(id);
                queued += 1;
            }
        }
        let pending: Vec<String> = st.pending_calls.keys().cloned().collect();
        for id in pending {
            self.settle(&mut st, &id);
        }
        st.status.last_reconcile = Some(Instant::now());
        queued
    }
}

fn describe_source(s: &Source) -> String {
    match s {
        Source::Api => "an endpoint registered through the API".into(),
        Source::Container { name, .. } => format!("an endpoint of container {name}"),
    }
}

fn enqueue(st: &mut State, id: &str) {
    if st.queued.insert(id.to_string()) {
        st.queue.push_back(id.to_string());
    }
}

fn upsert(st: &mut State, spec: EndpointSpec, held: Option<DownReason>) {
    let id = spec.id.clone();
    match st.entries.get_mut(&id) {
        Some(e) if e.spec == spec && e.held == held && e.drain.is_none() => return,
        Some(e) => {
            e.spec = spec;
            e.held = held;
            e.drain = None;
        }
        None => {
            let mut e = Entry::new(spec);
            e.held = held;
            st.entries.insert(id.clone(), e);
        }
    }
    st.failed.remove(&id);
    enqueue(st, &id);
}

fn remove(st: &mut State, id: &str) {
    if st.entries.remove(id).is_some() || st.written.contains_key(id) {
        st.failed.remove(id);
        enqueue(st, id);
    }
}

fn start_drain(st: &mut State, id: &str, period: Duration) -> Option<(String, u64)> {
    st.next_gen += 1;
    let gen = st.next_gen;
    let e = st.entries.get_mut(id)?;
    if e.drain.is_some() {
        return None;
    }
    e.drain = Some(Drain { until: Instant::now() + period, gen });
    enqueue(st, id);
    Some((id.to_string(), gen))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::{tests::inspect, ContainerInfo};
    use crate::target::tests::{settings, spec};

    fn shared() -> Arc<Shared> {
        Shared::new(Arc::new(settings(&[])))
    }

    /// What the applier would do: take every queued change and pretend Consul accepted it.
    fn apply_all(s: &Shared) -> Vec<(String, bool)> {
        let mut done = Vec::new();
        while let Some((id, t, _)) = s.next_change() {
            let w = Written {
                service: t.service.as_ref().map(|st| WrittenService { hash: st.hash.clone(), maintenance: st.maintenance.is_some() }),
                kv: t.kv.as_ref().map(|(k, v)| WrittenKv { key: k.clone(), value: v.clone(), index: 1 }),
                record: t.record.clone(),
            };
            done.push((id.clone(), !w.is_empty()));
            s.set_written(&id, w);
        }
        done
    }

    #[test]
    fn changes_keep_their_order_and_coalesce() {
        let s = shared();
        s.api_put(spec("a", "10.0.0.1", 80)).unwrap();
        s.api_put(spec("b", "10.0.0.2", 80)).unwrap();
        s.api_put(spec("c", "10.0.0.3", 80)).unwrap();
        // Changed twice before being applied: applied once, with the last state.
        let mut a2 = spec("a", "10.0.0.1", 80);
        a2.weight = 7;
        s.api_put(a2).unwrap();
        // Added and removed before being applied: never applied.
        assert_eq!(s.api_delete("web", "b", None), DeleteOutcome::Deleted);
        // A transient failure on the first puts it back in front.
        let (first, _, _) = s.next_change().unwrap();
        assert_eq!(first, "a");
        s.retry_first(first);
        assert_eq!(apply_all(&s), vec![("a".to_string(), true), ("c".to_string(), true)]);
        let a = s.list(None).into_iter().find(|e| e.spec.id == "a").unwrap();
        assert_eq!(a.spec.weight, 7);
        assert!(a.synced);
        // Nothing left to do, and an identical PUT queues nothing.
        assert_eq!(s.api_put(spec("c", "10.0.0.3", 80)).unwrap(), PutOutcome::Unchanged);
        assert!(s.next_change().is_none());
    }

    #[test]
    fn conflicting_puts_name_the_field() {
        let s = shared();
        s.api_put(spec("a", "10.0.0.1", 80)).unwrap();
        assert_eq!(s.api_put(spec("b", "10.0.0.1", 80)).unwrap_err().field, "address");
        let mut other = spec("a", "10.0.0.9", 80);
        other.service = "api".into();
        assert_eq!(s.api_put(other).unwrap_err().field, "id");
        assert!(matches!(s.api_delete("api", "a", None), DeleteOutcome::Conflict(_)));
    }

    #[tokio::test]
    async fn container_endpoints_are_not_removed_before_the_engine_was_listed() {
        let s = shared();
        let info = ContainerInfo::from_inspect(&inspect("podman-inspect-slirp.json")).unwrap();
        let mut c = spec("node-a:web3:80", "127.0.0.1", 18083);
        c.source = Source::Container { id: info.id.clone(), name: info.name.clone() };
        let api = spec("api-1", "10.0.0.1", 80);
        // What Consul holds after a restart: one container endpoint, one API endpoint.
        let reality = |sp: &EndpointSpec| {
            let t = target(sp, None, &s.settings);
            let w = Written {
                service: t.service.as_ref().map(|st| WrittenService { hash: st.hash.clone(), maintenance: false }),
                kv: t.kv.as_ref().map(|(k, v)| WrittenKv { key: k.clone(), value: v.clone(), index: 5 }),
                record: t.record.clone(),
            };
            (sp.id.clone(), (w, Some(Record { spec: sp.clone(), draining: false, kv_key: t.kv.map(|(k, _)| k) })))
        };
        let consul: HashMap<_, _> = [reality(&c), reality(&api)].into_iter().collect();

        // First reconcile, engine not listed yet: the API endpoint is loaded, in step; the
        // container endpoint is kept.
        assert_eq!(s.reconcile(consul.clone()), 0);
        assert_eq!(s.list(None).len(), 1);
        assert!(s.next_change().is_none());

        // The engine lists no such container: now it is removed.
        s.engine_synced();
        assert!(s.take_reconcile_request());
        assert_eq!(s.reconcile(consul), 1);
        let (id, t, w) = s.next_change().unwrap();
        assert_eq!(id, c.id);
        assert_eq!(t, Target::default());
        assert_eq!(w.kv.unwrap().index, 5, "the delete must be CAS'd on the index read back");
    }

    #[tokio::test]
    async fn api_calls_made_before_the_records_were_read_win() {
        let s = shared();
        let old = spec("api-1", "10.0.0.1", 80);
        let t = target(&old, None, &s.settings);
        let rec = Record { spec: old.clone(), draining: false, kv_key: None };
        let written = Written { record: t.record.clone(), ..Default::default() };
        // Deleted through the API while Consul was unreachable at start.
        assert_eq!(s.api_delete("web", "api-1", None), DeleteOutcome::NotFound);
        s.reconcile(HashMap::from([("api-1".to_string(), (written.clone(), Some(rec.clone())))]));
        assert!(s.list(None).is_empty());
        assert_eq!(s.next_change().map(|c| c.0), Some("api-1".to_string()), "its record must be removed");

        // A record of an endpoint that was draining when the sidecar stopped is not revived.
        let s = shared();
        let rec = Record { draining: true, ..rec };
        s.reconcile(HashMap::from([("api-1".to_string(), (written, Some(rec)))]));
        assert!(s.list(None).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stopping_container_is_drained_for_at_most_its_stop_timeout() {
        let s = Shared::new(Arc::new(settings(&["--drain", "60s"])));
        let mut info = ContainerInfo::from_inspect(&inspect("podman-inspect-slirp.json")).unwrap();
        info.stop_timeout = Duration::from_secs(3);
        let mut c = spec("node-a:web3:80", "127.0.0.1", 18083);
        c.source = Source::Container { id: info.id.clone(), name: info.name.clone() };
        s.container_up(info.clone(), Mapped { endpoints: vec![c.clone()], ..Default::default() });
        apply_all(&s);

        s.container_stopping(&info.id);
        let (_, t, _) = s.next_change().unwrap();
        assert!(t.kv.as_ref().unwrap().1.contains("\"down\":1"));
        assert!(t.service.as_ref().unwrap().maintenance.is_some());
        assert_eq!(s.list(None)[0].state, "draining");
        // A second report of the same stop changes nothing.
        s.container_stopping(&info.id);
        assert!(s.next_change().is_none());

        tokio::time::sleep(Duration::from_millis(3100)).await;
        tokio::task::yield_now().await;
        assert!(s.list(None).is_empty(), "still registered after the stop timeout");
        assert_eq!(s.next_change().map(|c| c.1), Some(Target::default()));

        // A Docker `kill` with a non-stop signal (HUP) does not drain.
        let s = shared();
        s.container_up(info.clone(), Mapped { endpoints: vec![c], ..Default::default() });
        apply_all(&s);
        s.container_signalled(&info.id, "SIGHUP");
        assert!(s.next_change().is_none());
        s.container_signalled(&info.id, "15");
        assert!(s.next_change().is_some());
    }

    #[tokio::test]
    async fn a_container_failing_its_own_health_check_is_registered_down() {
        let s = shared();
        let mut info = ContainerInfo::from_inspect(&inspect("podman-inspect-slirp.json")).unwrap();
        let mut c = spec("node-a:web3:80", "127.0.0.1", 18083);
        c.source = Source::Container { id: info.id.clone(), name: info.name.clone() };
        let up = |info: &ContainerInfo| s.container_up(info.clone(), Mapped { endpoints: vec![c.clone()], ..Default::default() });
        for (health, state, down) in [
            (Some(HealthState::Starting), "starting", true),
            (Some(HealthState::Healthy), "active", false),
            (Some(HealthState::Unhealthy), "unhealthy", true),
            (None, "active", false),
        ] {
            info.health = health;
            up(&info);
            let (_, t, _) = s.next_change().unwrap_or_else(|| panic!("no change for {health:?}"));
            assert_eq!(t.kv.as_ref().unwrap().1.contains("\"down\":1"), down, "{health:?}");
            assert_eq!(t.service.as_ref().unwrap().maintenance.is_some(), down, "{health:?}: maintenance is Consul's critical check");
            assert_eq!(s.list(None)[0].state, state);
            apply_all(&s);
            // The same report again changes nothing.
            up(&info);
            assert!(s.next_change().is_none());
        }
    }
}
