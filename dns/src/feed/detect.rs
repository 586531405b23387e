//! Change detection: the detectors' blocking queries (the whole catalog's service and node
//! lists, the health states) and the hot services' own, on the discovery library's watch in
//! index mode.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use upsync_discovery::decode::{decode_health_instances, HealthMode};
use upsync_discovery::{Backoff, Client, IndexEvent, Query, RateLimit, Watch, WatchOptions};

use super::reads::{log_skipped, Read};
use super::state::Event;

/// A detector may send this many requests back to back, then a sustained rate: a single
/// change is seen at once, an index changing without pause cannot make it spin. The health
/// lists are cheap for Consul (read through its status index, a few entries); the catalog
/// lists grow with the number of services and each change costs a full read anyway.
const REQUEST_BURST: u32 = 10;
const HEALTH_REQUESTS_PER_SECOND: f64 = 200.0;
/// One service's list is small, but a flapping one must not make its watch spin.
const HOT_REQUESTS_PER_SECOND: f64 = 50.0;
/// Blocking-query wait of the hot watches (see `hot_watch`): 32 of them cost Consul about 3
/// small requests a second when nothing changes.
const HOT_WAIT: Duration = Duration::from_secs(10);
const CATALOG_REQUESTS_PER_SECOND: f64 = 100.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Kind {
    Services,
    Nodes,
    Critical,
    Warning,
    Catalog,
    Patch,
    Counts,
}

impl Kind {
    pub(super) fn name(self) -> &'static str {
        match self {
            Kind::Services => "catalog-services",
            Kind::Nodes => "catalog-nodes",
            Kind::Critical => "health-critical",
            Kind::Warning => "health-warning",
            Kind::Catalog => "node-dump",
            Kind::Patch => "health-service",
            Kind::Counts => "ui-services",
        }
    }
}

/// The watch settings of a detector or hot watch: a burst, then `per_second`.
fn watch_options(wait: Duration, per_second: f64) -> WatchOptions {
    WatchOptions { wait, rate: RateLimit { burst: REQUEST_BURST, per_second }, backoff: Backoff::default(), ramp_from: None }
}

/// Blocking query reporting every change of `X-Consul-Index` (the watch's index mode: the
/// catalog detector's body, the list of service names, stays the same when an instance comes
/// or goes), and every other answer as [`Event::Ok`].
pub(super) async fn detector(client: Client, kind: Kind, path: String, wait: Duration, tx: mpsc::Sender<Event>) {
    let rate = if matches!(kind, Kind::Critical | Kind::Warning) { HEALTH_REQUESTS_PER_SECOND } else { CATALOG_REQUESTS_PER_SECOND };
    let mut watch = Watch::new(client, Query::Raw { path }, watch_options(wait, rate));
    loop {
        let ev = match watch.next_index().await {
            IndexEvent::Moved { response, reset } => Event::Changed { kind, index: response.index, body: response.body, reset },
            IndexEvent::Same { .. } => Event::Ok(kind),
            // The watch waits `retry_in` before its next request.
            IndexEvent::Error { error, retry_in, .. } => Event::Failed { kind, error: error.to_string(), retry_in },
        };
        if tx.send(ev).await.is_err() {
            return;
        }
    }
}

/// Blocking query on one hot service (see the module doc): reports every change of its
/// index, until `retired` is set; then it ends after the request under way. It is not
/// aborted: Consul 1.8 goes on holding a blocking query whose client went away until its wait
/// ends, and counts its connection against `http_max_conns_per_client` meanwhile (aborting
/// watches as services cool down exhausted that limit in a bulk registration: Consul then
/// resets every new connection from the host). Its wait is short ([`HOT_WAIT`]) for the same
/// reason. Failures are retried with backoff and not reported: the detectors and the one-off
/// patches say whether Consul answers, and the full read covers the service anyway.
pub(super) async fn hot_watch(client: Client, service: String, epoch: u64, retired: Arc<AtomicBool>, tx: mpsc::Sender<Event>) {
    let query = Query::HealthService { name: service.clone(), tag: None, mode: HealthMode::MarkDown };
    let path = query.path();
    let mut watch = Watch::new(client, query, watch_options(HOT_WAIT, HOT_REQUESTS_PER_SECOND));
    while !retired.load(Ordering::Relaxed) {
        let resp = match watch.next_index().await {
            IndexEvent::Moved { response, .. } => response,
            IndexEvent::Same { .. } => continue,
            IndexEvent::Error { error, retry_in, .. } => {
                tracing::debug!(%service, "hot service watch failed: {error}");
                // The backoff is waited out here rather than at the start of the next request,
                // so that a watch given up meanwhile ends without sending one.
                tokio::time::sleep(retry_in).await;
                continue;
            }
        };
        match decode_health_instances(if resp.status == 404 { b"" } else { &resp.body }) {
            Ok(decoded) => {
                log_skipped(&decoded.skipped);
                let read = Read::new(resp.index, epoch, decoded.value);
                if tx.send(Event::Watched { service: service.clone(), read }).await.is_err() {
                    return;
                }
            }
            Err(e) => tracing::debug!(%service, "{} answered {path} with {e}", resp.address),
        }
    }
}
