//! upsync-sidecar: registers the containers of this host and the endpoints a scheduler gives it
//! in Consul (agent services with checks, and upsync KV entries the nginx module reads), drains
//! them before removing them, and reconciles Consul with reality. See README.md.
//!
//! Four tasks share one [`state::Shared`]: the engine watcher ([`engine`]), the scheduler API
//! ([`api`]), the node lock ([`lock`]) and the applier ([`applier`]), which alone writes
//! endpoints to Consul, and only while this sidecar holds its node's lock. The API's calls are
//! recorded on disk ([`journal`]) before they are answered. A task that panics or ends stops
//! the process with an error.
#![forbid(unsafe_code)]
pub mod api;
pub mod applier;
pub mod config;
pub mod container;
pub mod engine;
pub mod journal;
pub mod lock;
pub mod mapping;
pub mod metrics;
pub mod model;
pub mod state;
pub mod target;

use std::sync::Arc;

use upsync_discovery::Client;

use crate::config::{LogFormat, Settings};

/// Logs to stderr; the level comes from `RUST_LOG` (default `info`).
pub fn init_logging(format: LogFormat) {
    upsync_discovery::logging::init("upsync-sidecar", format, "info");
}

/// Runs the sidecar until SIGTERM or SIGINT. Registrations stay in Consul when it stops: a
/// restarted sidecar reconciles them, so a restart or an upgrade drops no endpoint.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    for w in &settings.deprecations {
        tracing::warn!("{w}");
    }
    let client = Client::new(settings.consul.clone()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let listen = settings.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen} for the API: {e}; choose another --listen"))?;
    if !listen.ip().is_loopback() && settings.api_token.is_none() {
        tracing::warn!(%listen, "the API listens beyond loopback without a bearer token: anyone who reaches it can register endpoints; set api.token_file");
    }
    let (journal, pending) = journal::Journal::open(&settings.state_dir, &settings.node_id)?;
    let shared = state::Shared::with_journal(Arc::new(settings), journal, pending);
    let s = &shared.settings;
    tracing::info!(
        node = %s.node_id, advertise_ip = %s.advertise_ip, consul = %s.consul.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(","), socket = %s.docker_socket.display(),
        api = %listen, kv_prefix = %s.kv_prefix, kv = s.kv_enabled, services = s.services_enabled, internal = s.internal,
        drain = ?s.drain, resync = ?s.resync, state_dir = %s.state_dir.display(), "upsync-sidecar starting"
    );
    // Test hook, read once here: the named task panics 3 s after start, so the tests can
    // check that a dead task stops the process (see README.md, Reliability).
    let hook = std::env::var("UPSYNC_SIDECAR_TEST_PANIC").ok();
    let mut locker = tokio::spawn(supervised("lock", hook.clone(), lock::run(Arc::clone(&shared), client.clone())));
    let mut applier = tokio::spawn(supervised("applier", hook.clone(), applier::run(Arc::clone(&shared), client.clone())));
    let mut engine = if shared.settings.engine_enabled {
        Some(tokio::spawn(supervised("engine", hook.clone(), engine::run(Arc::clone(&shared)))))
    } else {
        tracing::info!("no container engine (--no-engine): only the API's endpoints are registered");
        shared.engine_synced();
        None
    };
    let app = api::router(Arc::clone(&shared));
    let server = axum::serve(listener, app).with_graceful_shutdown(shutdown_signal());
    let engine_done = async {
        match engine.as_mut() {
            Some(h) => h.await,
            None => std::future::pending().await,
        }
    };
    // A task that ends (they run forever) or panics stops the process with an error: a
    // service manager restarts it, and /healthz never answers for a dead task.
    let served = tokio::select! {
        r = &mut applier => return Err(task_died("applier", r)),
        r = &mut locker => return Err(task_died("lock", r)),
        r = engine_done => return Err(task_died("engine", r)),
        served = server => served,
    };
    applier.abort();
    locker.abort();
    if let Some(e) = engine {
        e.abort();
    }
    lock::release(&shared, &client).await;
    served.map_err(|e| anyhow::anyhow!("API server on {listen}: {e}"))?;
    tracing::info!("stopped; registrations are kept in Consul for the next start to reconcile");
    Ok(())
}

async fn supervised(name: &'static str, hook: Option<String>, task: impl std::future::Future<Output = ()>) {
    if hook.as_deref() == Some(name) {
        tokio::select! {
            _ = task => {}
            _ = tokio::time::sleep(std::time::Duration::from_secs(3)) => panic!("UPSYNC_SIDECAR_TEST_PANIC={name}: test hook"),
        }
    } else {
        task.await
    }
}

fn task_died(name: &str, r: Result<(), tokio::task::JoinError>) -> anyhow::Error {
    let why = match r {
        Ok(()) => "ended".to_string(),
        Err(e) if e.is_panic() => {
            let p = e.into_panic();
            let msg = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_default();
            format!("panicked: {msg}")
        }
        Err(e) => format!("failed: {e}"),
    };
    anyhow::anyhow!("the {name} task {why}; exiting so that the service manager restarts the sidecar (registrations are kept in Consul)")
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot watch SIGTERM ({e}); stop with SIGINT");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
    }
}
