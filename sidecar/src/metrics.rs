//! `GET /metrics`: the sidecar's state as Prometheus metrics (OpenMetrics text, the same
//! encoder and content type as upsync-dns and the nginx module). The values are read from the
//! shared state at the scrape; names follow the other two programs where the meaning is the
//! same (`..._consul_up`, `..._consul_errors_total`, `..._last_sync_age_seconds`).
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::state::{LockState, Status};

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What a scrape shows: the status, the changes waiting for Consul, this node's endpoints.
pub struct Snapshot<'a> {
    pub status: &'a Status,
    pub pending_changes: usize,
    pub endpoints: usize,
    pub engine_enabled: bool,
}

fn gauge(registry: &mut Registry, name: &str, help: &str, v: i64) {
    let g: Gauge = Gauge::default();
    g.set(v);
    registry.register(name, help, g);
}

/// The text exposition of `s`.
pub fn render(s: &Snapshot) -> String {
    let st = s.status;
    let mut r = Registry::default();
    gauge(
        &mut r,
        "upsync_sidecar_consul_up",
        "1 while Consul answers the sidecar's requests, 0 while it fails (changes wait on disk)",
        st.consul_reachable as i64,
    );
    let errors: Counter = Counter::default();
    errors.inc_by(st.consul_errors);
    r.register("upsync_sidecar_consul_errors", "Failed Consul requests (writes, reconciles, the node's lock)", errors);
    if s.engine_enabled {
        gauge(&mut r, "upsync_sidecar_engine_up", "1 while the container engine's socket answers", st.engine_connected as i64);
    }
    let held = matches!(st.lock, LockState::Held | LockState::Unavailable(_));
    gauge(
        &mut r,
        "upsync_sidecar_lock_held",
        "1 while this sidecar may write its node's registrations (it holds the node's lock, or ACLs do not allow one)",
        held as i64,
    );
    gauge(
        &mut r,
        "upsync_sidecar_lock_conflict",
        "1 while another sidecar with the same node id holds the lock",
        matches!(st.lock, LockState::Conflict(_)) as i64,
    );
    gauge(&mut r, "upsync_sidecar_endpoints", "Endpoints of this node (containers' and the API's)", s.endpoints as i64);
    gauge(&mut r, "upsync_sidecar_pending_changes", "Changes recorded but not yet written to Consul", s.pending_changes as i64);
    gauge(
        &mut r,
        "upsync_sidecar_invalid_records",
        "Ownership records found invalid at the last reconcile (reported, never acted on)",
        st.invalid_records.len() as i64,
    );
    if let Some(t) = st.last_reconcile {
        let g: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
        g.set(t.elapsed().as_secs_f64());
        r.register(
            "upsync_sidecar_last_sync_age_seconds",
            "Seconds since the last complete reconcile with Consul (absent until the first)",
            g,
        );
    }
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &r);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_show_the_status() {
        let status = Status {
            lock: LockState::Held,
            consul_reachable: true,
            consul_errors: 3,
            engine_connected: false,
            last_reconcile: Some(tokio::time::Instant::now()),
            ..Default::default()
        };
        let text = render(&Snapshot { status: &status, pending_changes: 2, endpoints: 5, engine_enabled: true });
        for line in [
            "upsync_sidecar_consul_up 1",
            "upsync_sidecar_consul_errors_total 3",
            "upsync_sidecar_engine_up 0",
            "upsync_sidecar_lock_held 1",
            "upsync_sidecar_lock_conflict 0",
            "upsync_sidecar_endpoints 5",
            "upsync_sidecar_pending_changes 2",
            "upsync_sidecar_invalid_records 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
        }
        assert!(text.contains("upsync_sidecar_last_sync_age_seconds "), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
        let status = Status { lock: LockState::Conflict("x".into()), ..Default::default() };
        let text = render(&Snapshot { status: &status, pending_changes: 0, endpoints: 0, engine_enabled: false });
        assert!(!text.contains("engine_up") && !text.contains("last_sync_age"), "{text}");
        assert!(text.lines().any(|l| l == "upsync_sidecar_lock_conflict 1"), "{text}");
    }
}
