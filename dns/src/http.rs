//! The operator's HTTP endpoint: `GET /metrics` (Prometheus/OpenMetrics text) and
//! `GET /health` (JSON; 200 once the first snapshot is loaded, 503 before).
//! At most 64 connections at once, each for at most 30 s.
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::server::Shared;

/// Connections served at once at most; more are closed at once.
const MAX_CONNECTIONS: usize = 64;
/// A connection is closed after this long, whatever it does (a scrape takes milliseconds).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves until the task is dropped. Accept failures (EMFILE...) back off (see
/// [`crate::tcp::accept`]); connections are bounded in number and in time.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let what = format!("the HTTP endpoint on {}", listener.local_addr().map_or("?".to_string(), |a| a.to_string()));
    let mut backoff = crate::tcp::Backoff::default();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = crate::tcp::accept(&listener, &what, &shared.metrics.shared, &mut backoff).await;
        let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let svc = service_fn(move |req| handle(req, shared.clone()));
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, http1::Builder::new().serve_connection(TokioIo::new(stream), svc)).await;
        });
    }
}

fn response(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

async fn handle(req: Request<Incoming>, shared: Arc<Shared>) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::GET {
        return Ok(response(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "use GET\n".into()));
    }
    Ok(match req.uri().path() {
        "/metrics" => response(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", shared.metrics.render()),
        "/health" => {
            let snap = shared.snapshot.load();
            let stale = shared.metrics.staleness(Instant::now());
            let consul_up = shared.metrics.feed.consul_up.get() == 1;
            let status = match (snap.synced, consul_up) {
                (false, _) => "starting",
                (true, true) => "ok",
                (true, false) => "stale",
            };
            let body = serde_json::json!({
                "status": status,
                "consul_up": consul_up,
                "snapshot_index": snap.index,
                "stale_seconds": stale.as_secs_f64(),
                "services": snap.stats.services,
                "instances": snap.stats.instances,
                "usable_instances": snap.stats.usable,
            });
            let code = if snap.synced { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            response(code, "application/json", format!("{body}\n"))
        }
        _ => response(StatusCode::NOT_FOUND, "text/plain", "not found: try /metrics or /health\n".into()),
    })
}
