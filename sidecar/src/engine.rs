//! The container engine side: the Docker Engine API on a unix socket (Docker, or podman's
//! `podman system service`), through bollard.
//!
//! A session lists the running containers, then follows the event stream (requested from just
//! before the listing, so nothing that happens in between is missed), re-lists running
//! containers every poll interval (podman sends no event when a stop begins, and events can be
//! lost) and re-inspects everything every resync interval. When the stream closes or the
//! engine stops answering, the session ends and a new one starts after a backoff: the sidecar
//! never exits because of the engine, and keeps what is registered meanwhile (the containers
//! usually outlive a restart of the engine's API service).
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::models::{EventMessage, EventMessageTypeEnum};
use bollard::query_parameters::{EventsOptions, InspectContainerOptions, ListContainersOptions};
use bollard::Docker;
use futures_util::StreamExt;
use tokio::time::Instant;
use upsync_discovery::Backoff;

use crate::container::{parse_lenient_inspect, ContainerInfo, RunState};
use crate::mapping::{map_container, MapContext};
use crate::state::Shared;

/// Per-request limit for engine calls (list, inspect); the event stream itself has none.
const ENGINE_TIMEOUT_SECS: u64 = 30;

struct Session {
    docker: Docker,
    shared: Arc<Shared>,
    /// Containers whose mapping warnings were logged already (logged once per container).
    warned: HashSet<String>,
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
    let mut sess = Session { docker, shared: Arc::clone(shared), warned: HashSet::new() };

    // Events from one second before the listing on: nothing falls between the two.
    let since = unix_now().saturating_sub(1);
    let count = sess.full_sync().await?;
    shared.set_engine_status(true, None);
    tracing::info!(socket = %path, api = %sess.docker.client_version(), containers = count, "connected to the container engine");
    shared.engine_synced();

    let mut filters = HashMap::new();
    filters.insert("type".to_string(), vec!["container".to_string()]);
    let mut events =
        sess.docker.events(Some(EventsOptions { since: Some(since.to_string()), until: None, filters: Some(filters) }));
    let poll = s.poll;
    let mut poll_tick = tokio::time::interval(if poll.is_zero() { Duration::from_secs(3600) } else { poll });
    poll_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut resync_tick = tokio::time::interval(s.resync);
    resync_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    poll_tick.tick().await;
    resync_tick.tick().await;
    loop {
        tokio::select! {
            ev = events.next() => match ev {
                None => return Ok(()),
                Some(Err(e)) => return Err(format!("event stream: {e}")),
                Some(Ok(ev)) => sess.event(ev).await?,
            },
            _ = poll_tick.tick(), if !poll.is_zero() => sess.poll().await?,
            _ = resync_tick.tick() => { sess.full_sync().await?; }
        }
    }
}

impl Session {
    async fn running_ids(&self) -> Result<HashSet<String>, String> {
        let list = self
            .docker
            .list_containers(Some(ListContainersOptions { all: false, ..Default::default() }))
            .await
            .map_err(|e| format!("listing containers: {e}"))?;
        Ok(list.into_iter().filter_map(|c| c.id).collect())
    }

    /// Lists and inspects every running container; forgets the ones that are gone.
    async fn full_sync(&mut self) -> Result<usize, String> {
        let running = self.running_ids().await?;
        for id in &running {
            self.inspect(id).await?;
        }
        for (id, _) in self.shared.known_containers() {
            if !running.contains(&id) {
                self.inspect(&id).await?;
            }
        }
        Ok(running.len())
    }

    /// Catches what the event stream did not say: containers that stopped running (a stop in
    /// progress, a pause, a missed die) and containers that run but were never seen.
    async fn poll(&mut self) -> Result<(), String> {
        let running = self.running_ids().await?;
        let known = self.shared.known_containers();
        let known_ids: HashSet<&str> = known.iter().map(|(id, _)| id.as_str()).collect();
        for (id, _) in &known {
            if !running.contains(id) {
                self.inspect(id).await?;
            }
        }
        for id in &running {
            if !known_ids.contains(id.as_str()) {
                self.inspect(id).await?;
            }
        }
        Ok(())
    }

    async fn event(&mut self, ev: EventMessage) -> Result<(), String> {
        if ev.typ.is_some_and(|t| t != EventMessageTypeEnum::CONTAINER) {
            return Ok(());
        }
        let Some(actor) = ev.actor else { return Ok(()) };
        let Some(id) = actor.id.filter(|id| !id.is_empty()) else { return Ok(()) };
        let action = ev.action.unwrap_or_default();
        // Docker writes some actions with details: "health_status: healthy", "exec_start: sh".
        let action = action.split(':').next().unwrap_or("").trim();
        tracing::debug!(container = %id, action, "engine event");
        match action {
            "start" | "restart" | "unpause" | "pause" => self.inspect(&id).await?,
            "die" | "stop" | "destroy" | "remove" => self.shared.container_gone(&id),
            "kill" => {
                // Docker names the signal; podman does not (its stops are seen by polling).
                if let Some(sig) = actor.attributes.as_ref().and_then(|a| a.get("signal")) {
                    self.shared.container_signalled(&id, sig);
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Inspects one container and tells the state what it found.
    async fn inspect(&mut self, id: &str) -> Result<(), String> {
        let r = match self.docker.inspect_container(id, None::<InspectContainerOptions>).await {
            Ok(r) => r,
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => {
                self.warned.remove(id);
                self.shared.container_gone(id);
                return Ok(());
            }
            Err(bollard::errors::Error::DockerResponseServerError { status_code, message }) => {
                // The engine answered: this container is the problem, not the connection.
                tracing::warn!(container = id, "the engine could not describe the container (HTTP {status_code}: {message})");
                return Ok(());
            }
            Err(bollard::errors::Error::JsonDataError { contents, message, .. }) => match parse_lenient_inspect(&contents) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(container = id, "cannot read the engine's description of the container: {message} ({e})");
                    return Ok(());
                }
            },
            Err(e) => return Err(format!("inspecting container {id}: {e}")),
        };
        let info = match ContainerInfo::from_inspect(&r) {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(container = id, "cannot use the engine's description of the container: {e}");
                return Ok(());
            }
        };
        match info.state {
            RunState::Running | RunState::Paused => {
                let s = &self.shared.settings;
                let ctx = MapContext {
                    node_id: &s.node_id,
                    advertise_ip: s.advertise_ip,
                    internal: s.internal,
                    defaults: &s.defaults,
                };
                let mapped = map_container(&info, &ctx);
                if self.warned.insert(info.id.clone()) {
                    for w in &mapped.warnings {
                        tracing::warn!(container = %info.name, "{w}");
                    }
                    if mapped.ignored {
                        tracing::info!(container = %info.name, "SERVICE_IGNORE set; not registered");
                    }
                }
                self.shared.container_up(info, mapped);
            }
            RunState::Stopping => {
                let id = info.id.clone();
                self.shared.container_stopping(&id);
            }
            RunState::Restarting | RunState::NotRunning => {
                self.warned.remove(&info.id);
                self.shared.container_gone(&info.id);
            }
        }
        Ok(())
    }
}
