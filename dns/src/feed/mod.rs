//! The Consul feed: keeps the served snapshot in step with Consul with a fixed number of
//! requests whatever the number of services (dns/README.md, "Watch plan"):
//!
//! - change detectors: blocking queries on `/v1/catalog/services` (wakes on any service
//!   registration, deregistration or update) and `/v1/catalog/nodes` (node changes; the
//!   services of a node whose address changed or that left are patched at once, below).
//!   A new index schedules one full read of the catalog, `/v1/internal/ui/nodes` (every node
//!   with its services and checks). Reads are coalesced (changes arriving during a read cause
//!   one more read, not one each) and spaced by their cost, so Consul spends at most
//!   `catalog_read_budget` (20%) of its time on them under constant churn;
//! - health overlays: blocking queries on `/v1/health/state/critical` (and `warning` when only
//!   passing instances are served). Consul indexes checks by status, so these are cheap, wake
//!   only when a check enters or leaves that state, and apply without a full read;
//! - patches: a service the detectors name (added, removed or retagged in the service list, or
//!   owning a check that changed state for an instance the snapshot does not know yet, e.g. a
//!   new instance turning passing) is read alone from `/v1/health/service/NAME` and patched
//!   in at once, until the next full read covers it;
//! - instance counts: when the service list's index moves, `/v1/internal/ui/services` (a
//!   summary per service, a tenth of the full read's cost) is read, spaced by the same budget;
//!   a service whose number of instances there differs from the snapshot's (an instance
//!   registered or deregistered without any other sign) is patched at once instead of
//!   waiting for the next full read. The counts go first: a full read does not start while
//!   they are being read, and a count read slowed by a full read already under way is
//!   spaced by what it costs alone, not by its slowed time;
//! - hot services: a service named by one of these changes (its instances come and go: it
//!   is being scaled) gets a blocking query of its own on `/v1/health/service/NAME`, for at
//!   most `hot_services` services at a time (the least recently changed gives its place up),
//!   so its next changes are seen in milliseconds whatever they are (an instance deregistered
//!   without a drain, re-registered with another port): the Consul load stays bounded by
//!   that number, not by the number of services;
//! - a full read every `resync_interval` regardless, as a safety net.
//!
//! A snapshot is rebuilt on a blocking thread and swapped in whole; answering never waits.
//! When Consul fails, the last snapshot keeps being served and the staleness is reported.
mod detect;
mod events;
mod inputs;
mod plan;
mod reads;
mod rebuild;
mod state;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use upsync_discovery::Client;

use crate::config::FeedConfig;
use crate::server::Shared;
use crate::snapshot::ZoneConfig;
use detect::{detector, Kind};
use state::State;

/// Applying changes for longer than this is logged (debug): later changes wait meanwhile.
const SLOW_LOOP: Duration = Duration::from_millis(20);
/// A warning about an unreachable Consul is repeated this often while it lasts.
const STALE_LOG_EVERY: Duration = Duration::from_secs(30);

/// The feed's state machine.
pub struct Feed {
    cfg: FeedConfig,
    zone: Arc<ZoneConfig>,
    shared: Arc<Shared>,
    client: Client,
}

impl Feed {
    pub fn new(cfg: FeedConfig, zone: Arc<ZoneConfig>, shared: Arc<Shared>) -> anyhow::Result<Feed> {
        let client = Client::new(cfg.consul.clone()).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Feed { cfg, zone, shared, client })
    }

    /// Runs until the task is dropped.
    pub async fn run(self) {
        let (tx, mut rx) = mpsc::channel(256);
        let mut detectors = vec![
            (Kind::Services, "/v1/catalog/services"),
            (Kind::Nodes, "/v1/catalog/nodes"),
            (Kind::Critical, "/v1/health/state/critical"),
        ];
        if self.zone.only_passing {
            detectors.push((Kind::Warning, "/v1/health/state/warning"));
        }
        // Dropped with this future: the detectors stop with the feed.
        let mut tasks = tokio::task::JoinSet::new();
        for (kind, path) in detectors {
            tasks.spawn(detector(self.client.clone(), kind, path.to_string(), self.cfg.wait, tx.clone()));
        }
        let mut st = State::default();
        let mut resync = tokio::time::interval(self.cfg.resync_interval);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resync.tick().await;
        let mut stale_tick = tokio::time::interval(STALE_LOG_EVERY);
        stale_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // The counts first: they name the service that changed in a fraction of the full
            // read's time, which must not make them wait or slow them down by running beside.
            let counts_now = st.counts.in_flight || st.counts.due().is_some_and(|t| t <= tokio::time::Instant::now());
            let (read_at, count_at) = (st.catalog.due().filter(|_| !counts_now), st.counts.due());
            tokio::select! {
                ev = rx.recv() => {
                    let Some(ev) = ev else { return };
                    let busy = Instant::now();
                    let mut dirty = self.on_event(&mut st, ev, &tx);
                    // Coalesce what queued up meanwhile into one rebuild.
                    while let Ok(ev) = rx.try_recv() {
                        dirty |= self.on_event(&mut st, ev, &tx);
                    }
                    if dirty {
                        self.rebuild(&mut st).await;
                    }
                    if busy.elapsed() > SLOW_LOOP {
                        tracing::debug!(ms = busy.elapsed().as_millis() as u64, "the feed took long to apply changes");
                    }
                }
                _ = tokio::time::sleep_until(read_at.unwrap_or_else(tokio::time::Instant::now)), if read_at.is_some() => {
                    self.start_catalog_read(&mut st, &tx);
                }
                _ = tokio::time::sleep_until(count_at.unwrap_or_else(tokio::time::Instant::now)), if count_at.is_some() => {
                    self.start_counts_read(&mut st, &tx);
                }
                _ = resync.tick() => {
                    // A read even without a change (only once a first one was wanted).
                    st.catalog.wanted |= st.dump.is_some();
                }
                _ = stale_tick.tick() => self.log_stale(&mut st, false),
            }
        }
    }
}

/// Drops `v` on a blocking thread: freeing a snapshot or a full read of 100,000 instances
/// takes tens of milliseconds that the feed loop would otherwise spend before the next
/// change (seen as 100 ms outliers in the freshness benchmark when a full read came in).
fn drop_aside<T: Send + 'static>(v: T) {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => drop(rt.spawn_blocking(move || drop(v))),
        Err(_) => drop(v),
    }
}
