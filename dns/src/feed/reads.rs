//! Reads: the full read of the catalog, one service read alone, the instance counts, and how
//! catalog-wide reads are spaced.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use upsync_discovery::decode::{decode_health_instances, decode_instance_counts, decode_node_dump, HealthMode};
use upsync_discovery::{Client, Endpoint, Query};

use super::detect::Kind;
use super::state::{Event, State};
use super::Feed;

/// At most this many patch reads at a time: with the detectors, the hot watches and the
/// catalog reads, upsync-dns stays far below the 200 connections Consul accepts from one
/// client address by default (beyond, Consul resets new connections: those of the other
/// clients on the host too).
pub(super) const PATCHES_IN_FLIGHT: usize = 8;

/// The full read and the instance counts (the client adds `dc` and the consistency mode).
const DUMP_PATH: &str = "/v1/internal/ui/nodes";
const COUNTS_PATH: &str = "/v1/internal/ui/services";

/// Instances read from Consul at `index`: the whole catalog, or one service (a patch).
#[derive(Default)]
pub(super) struct Read {
    pub(super) index: u64,
    /// Incremented when Consul's index goes backwards (see `State::epoch`).
    pub(super) epoch: u64,
    pub(super) endpoints: Vec<Endpoint>,
    /// For the whole catalog: service name -> its endpoints (indexes), node -> its services.
    pub(super) by_service: HashMap<String, Vec<usize>>,
    pub(super) by_node: HashMap<String, Vec<String>>,
}

impl Read {
    pub(super) fn new(index: u64, epoch: u64, endpoints: Vec<Endpoint>) -> Read {
        Read { index, epoch, endpoints, ..Read::default() }
    }

    /// Indexes a whole-catalog read by service and by node.
    pub(super) fn indexed(mut self) -> Read {
        for (i, e) in self.endpoints.iter().enumerate() {
            let service = e.service.clone().unwrap_or_default();
            let names = self.by_node.entry(e.node.clone().unwrap_or_default()).or_default();
            if !names.contains(&service) {
                names.push(service.clone());
            }
            self.by_service.entry(service).or_default().push(i);
        }
        self
    }
}

/// A catalog-wide read (the node dump, the instance counts): wanted after a change, at most
/// one in flight (changes meanwhile cause one more read, not one each), and spaced by its own
/// cost so that Consul spends at most `catalog_read_budget` of its time on it.
#[derive(Default)]
pub(super) struct SpacedRead {
    pub(super) wanted: bool,
    pub(super) in_flight: bool,
    pub(super) not_before: Option<tokio::time::Instant>,
    /// The read in flight ran beside the other catalog-wide read for a while: its time is
    /// partly the other's (they shared Consul's CPU) and must not stretch its own spacing.
    pub(super) overlapped: bool,
    /// What the last read run alone took.
    pub(super) alone: Option<Duration>,
}

impl SpacedRead {
    /// When the next read may start: `None` unless one is wanted and none is in flight.
    pub(super) fn due(&self) -> Option<tokio::time::Instant> {
        (self.wanted && !self.in_flight).then(|| self.not_before.unwrap_or_else(tokio::time::Instant::now))
    }

    /// Starts a read while `other` (the other catalog-wide read) may be in flight.
    pub(super) fn start_beside(&mut self, other: &mut SpacedRead) {
        (self.in_flight, self.wanted, self.not_before, self.overlapped) = (true, false, None, other.in_flight);
        other.overlapped |= other.in_flight;
    }

    /// The read failed: again after `retry_in`.
    pub(super) fn failed(&mut self, retry_in: Duration) {
        (self.in_flight, self.wanted, self.not_before, self.overlapped) =
            (false, true, Some(tokio::time::Instant::now() + retry_in), false);
    }

    /// The answer belongs to data that is gone (an older epoch): read again.
    pub(super) fn discarded(&mut self) {
        (self.in_flight, self.wanted, self.overlapped) = (false, true, false);
    }

    /// The read took `took`: the next one waits `cost × (1 / budget − 1)`, where the cost is
    /// `took`, or for a read that ran beside the other one what it takes alone (the last
    /// such read; at least half of `took`, in case the catalog grew since).
    pub(super) fn done(&mut self, took: Duration, budget: f64) {
        let cost = if self.overlapped { took.min((took / 2).max(self.alone.unwrap_or(took))) } else { took };
        if !self.overlapped {
            self.alone = Some(took);
        }
        (self.in_flight, self.overlapped) = (false, false);
        self.not_before = Some(tokio::time::Instant::now() + cost.mul_f64(1.0 / budget - 1.0));
    }
}

/// Permits for patch reads, `PATCHES_IN_FLIGHT` of them.
#[derive(Clone)]
pub(super) struct PatchSlots(pub(super) Arc<tokio::sync::Semaphore>);

impl Default for PatchSlots {
    fn default() -> Self {
        PatchSlots(Arc::new(tokio::sync::Semaphore::new(PATCHES_IN_FLIGHT)))
    }
}

pub(super) fn log_skipped(skipped: &[upsync_discovery::Skipped]) {
    for s in skipped.iter().take(20) {
        tracing::warn!(instance = %s.key, "instance left out of DNS: {}", s.reason);
    }
}

/// One full read of the catalog, decoded off the runtime's threads.
async fn read_catalog(client: Client, path: String, epoch: u64, metrics: Arc<crate::metrics::Metrics>) -> Result<Read, String> {
    let started = Instant::now();
    let resp = client.get(&path, None).await.map_err(|e| e.to_string())?;
    let bytes = resp.body.len();
    let (index, address) = (resp.index, resp.address.clone());
    let decoded =
        tokio::task::spawn_blocking(move || decode_node_dump(&resp.body).map(|d| (Read::new(index, epoch, d.value).indexed(), d.skipped)))
            .await
            .map_err(|e| format!("decoding the node dump: {e}"))?
            .map_err(|e| format!("{address} answered {path} with {e}"))?;
    let (read, skipped) = decoded;
    log_skipped(&skipped);
    let took = started.elapsed();
    let f = &metrics.feed;
    f.catalog_reads.inc();
    f.catalog_read_seconds.set(took.as_secs_f64());
    f.catalog_read_bytes.set(bytes as i64);
    tracing::debug!(index, bytes, instances = read.endpoints.len(), ms = took.as_millis() as u64, "read the catalog");
    Ok(read)
}

/// One service, from `/v1/health/service/NAME`.
pub(super) async fn read_service(client: Client, service: String, epoch: u64) -> Result<Read, String> {
    let path = Query::HealthService { name: service, tag: None, mode: HealthMode::MarkDown }.path();
    let resp = client.get(&path, None).await.map_err(|e| e.to_string())?;
    let decoded = decode_health_instances(if resp.status == 404 { b"" } else { &resp.body })
        .map_err(|e| format!("{} answered {path} with {e}", resp.address))?;
    log_skipped(&decoded.skipped);
    Ok(Read::new(resp.index, epoch, decoded.value))
}

/// Instances per service from `/v1/internal/ui/services`, decoded off the runtime's threads;
/// and how long the read took.
async fn read_counts(client: Client, path: String) -> Result<(HashMap<String, u64>, Duration), String> {
    let started = Instant::now();
    let resp = client.get(&path, None).await.map_err(|e| e.to_string())?;
    let address = resp.address.clone();
    let counts = tokio::task::spawn_blocking(move || decode_instance_counts(&resp.body))
        .await
        .map_err(|e| format!("decoding the service summary: {e}"))?
        .map_err(|e| format!("{address} answered {path} with {e}"))?;
    Ok((counts, started.elapsed()))
}

/// An instance as the feed knows it: `(node, service id)`.
pub(super) fn instance_key(e: &Endpoint) -> (String, String) {
    (e.node.clone().unwrap_or_default(), e.service_id.clone().unwrap_or_default())
}

impl Feed {
    /// Starts a full read of the catalog; [`Event::Dumped`] brings it back.
    pub(super) fn start_catalog_read(&self, st: &mut State, tx: &mpsc::Sender<Event>) {
        st.catalog.start_beside(&mut st.counts);
        let (client, tx, metrics, epoch) = (self.client.clone(), tx.clone(), self.shared.metrics.clone(), st.epoch);
        tokio::spawn(async move {
            let ev = match read_catalog(client, DUMP_PATH.to_string(), epoch, metrics).await {
                Ok(read) => Event::Dumped(read),
                Err(error) => Event::Failed { kind: Kind::Catalog, error, retry_in: Duration::from_secs(1) },
            };
            let _ = tx.send(ev).await;
        });
    }

    /// Starts a read of the instance counts; [`Event::Counted`] brings it back.
    pub(super) fn start_counts_read(&self, st: &mut State, tx: &mpsc::Sender<Event>) {
        st.counts.start_beside(&mut st.catalog);
        let (client, tx, epoch) = (self.client.clone(), tx.clone(), st.epoch);
        tokio::spawn(async move {
            let ev = match read_counts(client, COUNTS_PATH.to_string()).await {
                Ok((counts, took)) => Event::Counted { epoch, counts, took },
                Err(error) => Event::Failed { kind: Kind::Counts, error, retry_in: Duration::from_secs(1) },
            };
            let _ = tx.send(ev).await;
        });
    }
}
