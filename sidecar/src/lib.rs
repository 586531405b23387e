//! upsync-sidecar: registers the containers of this host and the endpoints a scheduler gives it
//! in Consul (agent services with checks, and upsync KV entries the nginx module reads), drains
//! them before removing them, and reconciles Consul with reality. See README.md.
//!
//! Three tasks share one [`state::Shared`]: the engine watcher ([`engine`]), the scheduler API
//! ([`api`]) and the applier ([`applier`]), which alone writes to Consul.
pub mod api;
pub mod applier;
pub mod config;
pub mod container;
pub mod engine;
pub mod mapping;
pub mod model;
pub mod state;
pub mod target;

use std::sync::Arc;

use upsync_discovery::{Client, ConsulAddr, ConsulConfig, TlsOptions};

use crate::config::{LogFormat, Settings};

/// Logs to stderr; the level comes from `RUST_LOG` (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The discovery client's configuration from the sidecar's settings.
pub fn consul_config(s: &Settings) -> anyhow::Result<ConsulConfig> {
    let addresses = s
        .consul
        .addresses
        .iter()
        .map(|a| ConsulAddr::parse(a).map_err(|e| anyhow::anyhow!("--consul: {e}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let c = &s.consul;
    let tls = (c.ca_file.is_some() || c.cert_file.is_some()).then(|| TlsOptions {
        ca_file: c.ca_file.clone(),
        cert_file: c.cert_file.clone(),
        key_file: c.key_file.clone(),
        server_name: None,
    });
    Ok(ConsulConfig {
        addresses,
        token: c.token.clone(),
        token_file: c.token_file.clone(),
        tls,
        datacenter: c.datacenter.clone(),
        request_timeout: c.request_timeout,
        ..ConsulConfig::default()
    })
}

/// Runs the sidecar until SIGTERM or SIGINT. Registrations stay in Consul when it stops: a
/// restarted sidecar reconciles them, so a restart or an upgrade drops no endpoint.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let client = Client::new(consul_config(&settings)?).map_err(|e| anyhow::anyhow!("{e}"))?;
    let listen = settings.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen} for the API: {e}; choose another --listen"))?;
    if !listen.ip().is_loopback() && settings.api_token.is_none() {
        tracing::warn!(%listen, "the API listens beyond loopback without a bearer token: anyone who reaches it can register endpoints; set api.token_file");
    }
    let shared = state::Shared::new(Arc::new(settings));
    let s = &shared.settings;
    tracing::info!(
        node = %s.node_id, advertise_ip = %s.advertise_ip, consul = ?s.consul.addresses, socket = %s.docker_socket.display(),
        api = %listen, kv_prefix = %s.kv_prefix, kv = s.kv_enabled, services = s.services_enabled, internal = s.internal,
        drain = ?s.drain, resync = ?s.resync, "upsync-sidecar starting"
    );
    let applier = tokio::spawn(applier::run(Arc::clone(&shared), client));
    let engine = if shared.settings.engine_enabled {
        Some(tokio::spawn(engine::run(Arc::clone(&shared))))
    } else {
        tracing::info!("no container engine (--no-engine): only the API's endpoints are registered");
        shared.engine_synced();
        None
    };
    let app = api::router(Arc::clone(&shared));
    let served = axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()).await;
    applier.abort();
    if let Some(e) = engine {
        e.abort();
    }
    served.map_err(|e| anyhow::anyhow!("API server on {listen}: {e}"))?;
    tracing::info!("stopped; registrations are kept in Consul for the next start to reconcile");
    Ok(())
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
