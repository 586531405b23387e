//! The operator's HTTP endpoint: `GET /metrics` (Prometheus/OpenMetrics text) and
//! `GET /health` (JSON; 200 once the first snapshot is loaded, 503 before).
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::server::Shared;

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, shared.clone()));
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
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
