//! The container engine side: the Docker Engine API on a unix socket (Docker, or podman's
//! `podman system service`), through bollard.
//!
//! A session lists and inspects the running containers, then follows the event stream
//! (requested from just before the listing, so nothing that happens in between is missed),
//! re-lists running containers every poll interval (podman sends no event when a stop begins,
//! and events can be lost) and re-inspects everything every resync interval.
//!
//! The loop never waits for the engine while events are queued: inspections and listings run
//! in the background (at most [`MAX_INFLIGHT`] at once) while events keep being handled, and a
//! result is only used if no event about that container arrived after it was asked for (a
//! `die` handled meanwhile is never undone by an older "running").
//!
//! A new container port is registered once it accepts TCP connections (readiness probe, at
//! most `--ready-timeout`), so nginx is never sent to a port nothing listens on yet.
//!
//! When the stream closes or the engine stops answering, the session ends and a new one starts
//! after a backoff: the sidecar never exits because of the engine, and keeps what is registered
//! meanwhile (the containers usually outlive a restart of the engine's API service).
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::models::{ContainerSummaryStateEnum, EventMessage, EventMessageTypeEnum};
use bollard::query_parameters::{EventsOptions, InspectContainerOptions, ListContainersOptions};
use bollard::Docker;
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use upsync_discovery::{Backoff, Host};

use crate::container::{parse_lenient_inspect, ContainerInfo, RunState};
use crate::mapping::{map_container, MapContext, Mapped};
use crate::model::Protocol;
use crate::state::Shared;

/// Per-request limit for engine calls (list, inspect); the event stream itself has none.
const ENGINE_TIMEOUT_SECS: u64 = 30;
/// Engine requests (inspect, list) in flight at once.
const MAX_INFLIGHT: usize = 8;

/// A background engine request and what it found.
enum Done {
    /// The running containers, listed from event sequence number `seq` on; `full` re-inspects
    /// all of them (resync), otherwise only the ones that changed (poll).
    Listed { seq: u64, full: bool, running: Result<HashSet<String>, String> },
    /// One container inspected from event sequence number `seq` on.
    Inspected { seq: u64, id: String, found: Result<Found, String> },
    /// A container port probed for readiness, asked when the container's last event was `seq`.
    Probed { seq: u64, container: String, endpoint: String, addr: SocketAddr, ready: bool },
}

type Work = Pin<Box<dyn Future<Output = Done> + Send>>;

struct Session {
    docker: Docker,
    shared: Arc<Shared>,
    /// Containers whose mapping warnings were logged already (logged once per container).
    warned: HashSet<String>,
    /// Number of events handled so far, and the number of the last event of each container.
    seq: u64,
    last_event: HashMap<String, u64>,
    work: FuturesUnordered<Work>,
    limit: Arc<Semaphore>,
    /// A listing is in flight (polls do not pile up).
    listing: bool,
    /// Inspections in flight, by container, with the event number they were asked at: the
    /// same question is not asked twice.
    inflight: HashMap<String, u64>,
    /// When the bookkeeping above was last pruned, and the event number then.
    pruned: (Instant, u64),
    /// Per container: the last description and mapping, and the endpoints that answered the
    /// readiness probe in this run of the container.
    latest: HashMap<String, (ContainerInfo, Mapped)>,
    ready: HashMap<String, HashSet<String>>,
    /// Readiness probes in flight: endpoint id → the container's event number when asked.
    probing: HashMap<String, u64>,
}

/// The engine task: runs forever.
pub async fn run(shared: Arc<Shared>) {
    let backoff = Backoff { initial: Duration::from_millis(200), max: Duration::from_secs(10) };
    let mut rng = fastrand::Rng::new();
    let mut failures: u32 = 0;
    let path = shared.settings.docker_socket.display().to_string();
    loop {
        let started = Instant::now();
        let result = session(&shared).await;
        let message = match &result {
            Ok(()) => format!("the event stream of the container engine at {path} closed"),
            Err(e) => format!("container engine at {path}: {e}"),
        };
        shared.set_engine_status(false, Some(message.clone()));
        if started.elapsed() > Duration::from_secs(30) {
            failures = 0;
        }
        failures += 1;
        let delay = backoff.delay(failures, &mut rng);
        if failures == 1 || failures.is_power_of_two() {
            tracing::warn!(retry_in = ?delay, attempt = failures, "{message}; reconnecting (registrations are kept meanwhile)");
        }
        tokio::time::sleep(delay).await;
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

async fn session(shared: &Arc<Shared>) -> Result<(), String> {
    let s = &shared.settings;
    let path = s.docker_socket.to_string_lossy().to_string();
    let docker = Docker::connect_with_unix(&path, ENGINE_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
        .map_err(|e| format!("{e}; check --docker-socket and that the engine (dockerd, podman system service) runs"))?;
    let docker = docker.negotiate_version().await.map_err(|e| format!("asking for its version: {e}"))?;
    let mut sess = Session {
        docker,
        shared: Arc::clone(shared),
        warned: HashSet::new(),
        seq: 0,
        last_event: HashMap::new(),
        work: FuturesUnordered::new(),
        limit: Arc::new(Semaphore::new(MAX_INFLIGHT)),
        listing: false,
        inflight: HashMap::new(),
        pruned: (Instant::now(), 0),
        latest: HashMap::new(),
        ready: HashMap::new(),
        probing: HashMap::new(),
    };

    // Events from one second before the listing on: nothing falls between the two. The first
    // listing completes before anything else: until then the state does not know what runs.
    let since = unix_now().saturating_sub(1);
    sess.start_listing(true);
    while let Some(done) = sess.work.next().await {
        sess.done(done)?;
    }
    shared.set_engine_status(true, None);
    let count = shared.known_containers().len();
    tracing::info!(socket = %path, api = %sess.docker.client_version(), containers = count, "connected to the container engine");
    shared.engine_synced();

    let mut filters = HashMap::new();
    filters.insert("type".to_string(), vec!["container".to_string()]);
    if let Some(l) = &s.container_label {
        filters.insert("label".to_string(), vec![l.clone()]);
    }
    let mut events = sess.docker.events(Some(EventsOptions { since: Some(since.to_string()), until: None, filters: Some(filters) }));
    let poll = s.poll;
    let mut poll_tick = tokio::time::interval(if poll.is_zero() { Duration::from_secs(3600) } else { poll });
    poll_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut resync_tick = tokio::time::interval(s.resync);
    resync_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    poll_tick.tick().await;
    resync_tick.tick().await;
    loop {
        tokio::select! {
            // Events first: nothing the stream already said waits for a poll.
            biased;
            ev = events.next() => match ev {
                None => return Ok(()),
                Some(Err(e)) => return Err(format!("event stream: {e}")),
                Some(Ok(ev)) => sess.event(ev),
            },
            Some(done) = sess.work.next(), if !sess.work.is_empty() => sess.done(done)?,
            _ = poll_tick.tick(), if !poll.is_zero() => sess.start_listing(false),
            _ = resync_tick.tick() => sess.start_listing(true),
        }
    }
}

impl Session {
    fn start_listing(&mut self, full: bool) {
        if self.listing && !full {
            return;
        }
        self.listing = true;
        let (docker, limit, seq) = (self.docker.clone(), Arc::clone(&self.limit), self.seq);
        let label = self.shared.settings.container_label.clone();
        self.work.push(Box::pin(async move {
            let _permit = limit.acquire_owned().await;
            Done::Listed { seq, full, running: running_ids(&docker, label.as_deref()).await }
        }));
    }

    fn start_inspect(&mut self, id: String) {
        let seq = self.last_event.get(&id).copied().unwrap_or(0);
        if self.inflight.get(&id) == Some(&seq) {
            return;
        }
        self.inflight.insert(id.clone(), seq);
        let (docker, limit, seq) = (self.docker.clone(), Arc::clone(&self.limit), self.seq);
        self.work.push(Box::pin(async move {
            let _permit = limit.acquire_owned().await;
            let found = fetch(&docker, &id).await;
            Done::Inspected { seq, id, found }
        }));
    }

    /// Forgets the event numbers of containers without news for a while: every request asked
    /// before the previous prune has finished or timed out by now.
    fn prune(&mut self) {
        if self.pruned.0.elapsed() > Duration::from_secs(2 * ENGINE_TIMEOUT_SECS) {
            let below = self.pruned.1;
            self.last_event.retain(|_, s| *s > below);
            self.inflight.retain(|_, s| *s > below);
            self.pruned = (Instant::now(), self.seq);
        }
    }

    /// Whether an event about `id` arrived after `seq` (a result asked for before is stale).
    fn newer_event(&self, id: &str, seq: u64) -> bool {
        self.last_event.get(id).is_some_and(|&e| e > seq)
    }

    fn done(&mut self, done: Done) -> Result<(), String> {
        match done {
            Done::Listed { seq, full, running } => {
                self.listing = false;
                let running = running?;
                if full {
                    self.prune();
                }
                let known = self.shared.known_containers();
                let known_ids: HashSet<&str> = known.iter().map(|(id, _)| id.as_str()).collect();
                // Known containers no longer running (stopping, paused, exited without an
                // event), and running ones never seen; a resync re-inspects all of them.
                let mut ids: Vec<String> = known.iter().map(|(id, _)| id.clone()).filter(|id| !running.contains(id)).collect();
                ids.extend(running.iter().filter(|id| full || !known_ids.contains(id.as_str())).cloned());
                for id in ids {
                    if !self.newer_event(&id, seq) {
                        self.start_inspect(id);
                    }
                }
            }
            Done::Probed { seq, container, endpoint, addr, ready } => {
                if self.probing.get(&endpoint) == Some(&seq) {
                    self.probing.remove(&endpoint);
                }
                if self.last_event.get(&container).copied().unwrap_or(0) != seq {
                    return Ok(()); // the container started again or stopped meanwhile
                }
                if ready {
                    tracing::debug!(container = %container, endpoint = %endpoint, "{addr} accepts connections");
                } else {
                    tracing::warn!(
                        container = %container, endpoint = %endpoint,
                        "{addr} did not accept connections within {:?}; registering it anyway",
                        self.shared.settings.ready_timeout
                    );
                }
                self.ready.entry(container.clone()).or_default().insert(endpoint);
                if let Some((info, mapped)) = self.latest.get(&container).cloned() {
                    self.running(info, mapped);
                }
            }
            Done::Inspected { seq, id, found } => {
                let asked_at = self.last_event.get(&id).copied().unwrap_or(0);
                if self.inflight.get(&id) == Some(&asked_at) && !self.newer_event(&id, seq) {
                    self.inflight.remove(&id);
                }
                let found = found?;
                if !self.newer_event(&id, seq) {
                    self.found(&id, found);
                }
            }
        }
        Ok(())
    }

    fn event(&mut self, ev: EventMessage) {
        if ev.typ.is_some_and(|t| t != EventMessageTypeEnum::CONTAINER) {
            return;
        }
        let Some(actor) = ev.actor else { return };
        let Some(id) = actor.id.filter(|id| !id.is_empty()) else { return };
        let action = ev.action.unwrap_or_default();
        // Docker writes some actions with details: "health_status: healthy", "exec_start: sh".
        let action = action.split(':').next().unwrap_or("").trim();
        let name = actor.attributes.as_ref().and_then(|a| a.get("name")).map(String::as_str).unwrap_or("");
        tracing::debug!(container = %id, name, action, "engine event");
        // `health_status` (Docker, and podman when its health checks run): re-read the status.
        let relevant =
            matches!(action, "start" | "restart" | "unpause" | "pause" | "health_status" | "die" | "stop" | "destroy" | "remove" | "kill");
        if !relevant {
            return;
        }
        self.seq += 1;
        self.last_event.insert(id.clone(), self.seq);
        match action {
            "start" | "restart" | "unpause" | "pause" | "health_status" => self.start_inspect(id),
            "kill" => {
                // Docker names the signal; podman does not (its stops are seen by polling).
                if let Some(sig) = actor.attributes.as_ref().and_then(|a| a.get("signal")) {
                    self.shared.container_signalled(&id, sig);
                }
            }
            _ => self.gone(&id),
        }
    }

    fn found(&mut self, id: &str, found: Found) {
        let info = match found {
            Found::Gone => {
                self.gone(id);
                return;
            }
            Found::Unreadable => return,
            Found::Info(info) => *info,
        };
        if let Some(l) = &self.shared.settings.container_label {
            let (key, value) = l.split_once('=').map_or((l.as_str(), None), |(k, v)| (k, Some(v)));
            let ours = info.labels.get(key).is_some_and(|v| value.is_none_or(|want| v == want));
            if !ours {
                return; // not one of ours (`--container-label`)
            }
        }
        match info.state {
            RunState::Running | RunState::Paused => {
                let s = &self.shared.settings;
                let ctx = MapContext { node_id: &s.node_id, advertise_ip: s.advertise_ip, internal: s.internal, defaults: &s.defaults };
                let mapped = map_container(&info, &ctx);
                if self.warned.insert(info.id.clone()) {
                    for w in &mapped.warnings {
                        tracing::warn!(container = %info.name, "{w}");
                    }
                    if mapped.ignored {
                        tracing::info!(container = %info.name, "SERVICE_IGNORE set; not registered");
                    }
                }
                self.running(info, mapped);
            }
            RunState::Stopping => {
                let id = info.id.clone();
                self.shared.container_stopping(&id);
            }
            RunState::Restarting | RunState::NotRunning => self.gone(&info.id),
        }
    }

    /// A container runs with these endpoints: the ones known to accept connections are
    /// registered now, the others once the readiness probe says so (nginx must not be sent to
    /// a port nothing listens on yet).
    fn running(&mut self, info: ContainerInfo, mapped: Mapped) {
        let cid = info.id.clone();
        let timeout = self.shared.settings.ready_timeout;
        let registered: HashSet<String> = self.shared.container_endpoint_ids(&cid).into_iter().collect();
        let seq = self.last_event.get(&cid).copied().unwrap_or(0);
        let mut now = Vec::new();
        for ep in &mapped.endpoints {
            let addr = match &ep.address {
                Host::Ip(ip) => Some(SocketAddr::new(*ip, ep.port)),
                Host::Name(_) => None,
            };
            let ready = timeout.is_zero()
                || info.state == RunState::Paused
                || ep.protocol == Protocol::Udp
                || registered.contains(&ep.id)
                || self.ready.get(&cid).is_some_and(|r| r.contains(&ep.id));
            match addr {
                Some(addr) if !ready => {
                    if self.probing.get(&ep.id) != Some(&seq) {
                        self.probing.insert(ep.id.clone(), seq);
                        let (container, endpoint) = (cid.clone(), ep.id.clone());
                        self.work.push(Box::pin(async move {
                            let ready = probe(addr, timeout).await;
                            Done::Probed { seq, container, endpoint, addr, ready }
                        }));
                    }
                }
                _ => now.push(ep.clone()),
            }
        }
        self.latest.insert(cid, (info.clone(), mapped.clone()));
        self.shared.container_up(info, Mapped { endpoints: now, ..mapped });
    }

    fn gone(&mut self, cid: &str) {
        self.warned.remove(cid);
        self.latest.remove(cid);
        self.ready.remove(cid);
        self.shared.container_gone(cid);
    }
}

/// Waits until `addr` accepts a TCP connection, for at most `timeout`.
async fn probe(addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    // Retries 1, 2, 4... then every 20 ms: a port that opens a moment after the engine's
    // `start` event (Docker sends it as the process starts) is seen within a millisecond or two.
    let mut pause = Duration::from_millis(1);
    loop {
        let attempt = tokio::time::timeout(Duration::from_millis(500), tokio::net::TcpStream::connect(addr)).await;
        if matches!(attempt, Ok(Ok(_))) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// The ids of the running containers.
async fn running_ids(docker: &Docker, label: Option<&str>) -> Result<HashSet<String>, String> {
    let filters = label.map(|l| HashMap::from([("label".to_string(), vec![l.to_string()])]));
    match docker.list_containers(Some(ListContainersOptions { all: false, filters, ..Default::default() })).await {
        Ok(list) => {
            Ok(list.into_iter().filter(|c| c.state.is_none_or(|s| s == ContainerSummaryStateEnum::RUNNING)).filter_map(|c| c.id).collect())
        }
        // podman lists containers in states Docker does not have (`stopped` right after an
        // exit): read the ids and states from the answer itself.
        Err(bollard::errors::Error::JsonDataError { contents, message, .. }) => {
            running_ids_lenient(&contents).map_err(|e| format!("listing containers: {message} ({e})"))
        }
        Err(e) => Err(format!("listing containers: {e}")),
    }
}

/// The running containers' ids from a container list bollard refused.
fn running_ids_lenient(json: &str) -> Result<HashSet<String>, String> {
    let list: Vec<serde_json::Value> = serde_json::from_str(json).map_err(|e| e.to_string())?;
    Ok(list
        .iter()
        .filter(|c| c["State"].as_str().is_none_or(|s| s == "running"))
        .filter_map(|c| c["Id"].as_str().map(str::to_string))
        .collect())
}

/// What inspecting a container found.
enum Found {
    Info(Box<ContainerInfo>),
    /// No such container (any more).
    Gone,
    /// The engine answered but the container cannot be used (logged).
    Unreadable,
}

/// Inspects one container. `Err` only when the engine itself failed (the session restarts).
async fn fetch(docker: &Docker, id: &str) -> Result<Found, String> {
    let started = Instant::now();
    let answer = docker.inspect_container(id, None::<InspectContainerOptions>).await;
    tracing::debug!(container = id, took_ms = started.elapsed().as_millis() as u64, "inspected");
    let r = match answer {
        Ok(r) => r,
        Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => return Ok(Found::Gone),
        Err(bollard::errors::Error::DockerResponseServerError { status_code, message }) => {
            // The engine answered: this container is the problem, not the connection.
            tracing::warn!(container = id, "the engine could not describe the container (HTTP {status_code}: {message})");
            return Ok(Found::Unreadable);
        }
        Err(bollard::errors::Error::JsonDataError { contents, message, .. }) => match parse_lenient_inspect(&contents) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(container = id, "cannot read the engine's description of the container: {message} ({e})");
                return Ok(Found::Unreadable);
            }
        },
        Err(e) => return Err(format!("inspecting container {id}: {e}")),
    };
    match ContainerInfo::from_inspect(&r) {
        Ok(i) => Ok(Found::Info(Box::new(i))),
        Err(e) => {
            tracing::warn!(container = id, "cannot use the engine's description of the container: {e}");
            Ok(Found::Unreadable)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn podman_container_lists_with_unknown_states_are_read() {
        let path = format!("{}/testdata/podman-list.json", env!("CARGO_MANIFEST_DIR"));
        let mut list: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        list[0]["State"] = "stopped".into();
        let text = list.to_string();
        assert!(serde_json::from_str::<Vec<bollard::models::ContainerSummary>>(&text).is_err(), "bollard accepts `stopped` now");
        let ids = running_ids_lenient(&text).unwrap();
        assert_eq!(ids.len(), 2);
        assert!(!ids.contains(list[0]["Id"].as_str().unwrap()));
    }
}
