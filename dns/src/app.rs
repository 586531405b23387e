//! Wiring: sockets, the Consul feed, the HTTP endpoint, graceful shutdown.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;
use crate::feed::Feed;
use crate::forward::Forwarder;
use crate::metrics::Metrics;
use crate::server::{Responder, Shared, UdpServer};
use crate::snapshot::Snapshot;
use crate::tcp::TcpServer;
/// How long in-flight TCP answers and forwarded queries get at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Logs to stderr as text or JSON lines. RUST_LOG wins over the configured level; hickory's
/// per-query logs are kept at warn unless RUST_LOG asks for them.
pub fn init_logging(cfg: &Config) {
    let level = cfg.log_level.as_deref().unwrap_or("info");
    let filter = format!("{level},hickory_server=warn,hickory_net=warn,hickory_resolver=warn,hickory_proto=warn");
    upsync_discovery::logging::init("upsync-dns", cfg.log_format, &filter);
}

/// Runs the server until SIGTERM or SIGINT, then stops gracefully.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let zone = Arc::new(cfg.zone.clone());
    let shared = Arc::new(Shared { snapshot: ArcSwap::from_pointee(Snapshot::empty(zone.clone())), metrics: Metrics::new() });
    let forwarder = Forwarder::new(&cfg.forward)?;
    let responder = Arc::new(Responder::new(shared.clone(), forwarder, &cfg.server));

    // Bind everything before starting anything: a taken port is a start-up error.
    let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let udp = UdpServer::start(&cfg.server.listen, cfg.server.udp_workers, responder.clone(), tokio::runtime::Handle::current())?;
    let mut listeners = Vec::new();
    for addr in &udp.bound {
        listeners.push(tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding TCP {addr}"))?);
    }
    let http = match cfg.metrics_listen {
        Some(a) => {
            let l = tokio::net::TcpListener::bind(a).await.with_context(|| format!("binding the metrics endpoint {a}"))?;
            let bound = l.local_addr()?;
            Some((tokio::spawn(crate::http::serve(l, shared.clone())), bound))
        }
        None => None,
    };
    let tcp = TcpServer::start(listeners, responder.clone(), cfg.server.max_tcp_connections, cfg.server.tcp_idle_timeout);
    let feed = tokio::spawn(Feed::new(cfg.feed.clone(), zone.clone(), shared.clone())?.run());

    let listen: Vec<String> = udp.bound.iter().map(SocketAddr::to_string).collect();
    let consul: Vec<String> = cfg.feed.consul.addresses.iter().map(|a| a.to_string()).collect();
    tracing::info!(
        zone = %zone.zone,
        listen = %listen.join(","),
        udp_workers = cfg.server.udp_workers,
        consul = %consul.join(","),
        forwarding = !cfg.forward.upstreams.is_empty(),
        metrics = %http.as_ref().map_or("off".to_string(), |(_, a)| format!("http://{a}/metrics")),
        "upsync-dns started"
    );
    for w in cfg.warnings() {
        tracing::warn!("{w}");
    }

    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = interrupt.recv() => tracing::info!("SIGINT: shutting down"),
    }
    feed.abort();
    if let Some((h, _)) = http {
        h.abort();
    }
    // UDP threads finish the packet in hand (at most one receive timeout).
    let stop_udp = tokio::task::spawn_blocking(move || udp.stop());
    if !tcp.shutdown(SHUTDOWN_GRACE).await {
        tracing::warn!("TCP connections still open after {SHUTDOWN_GRACE:?}; closing them");
    }
    let _ = stop_udp.await;
    tracing::info!("stopped");
    Ok(())
}
