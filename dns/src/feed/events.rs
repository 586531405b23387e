//! How each event changes the feed's state.
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use upsync_discovery::decode::{decode_check_states, decode_node_addresses, decode_services};

use super::detect::Kind;
use super::inputs::{Inputs, Overlay};
use super::plan::{stale_services, MAX_NODE_PATCHES};
use super::reads::Read;
use super::state::{Event, State};
use super::{drop_aside, Feed, STALE_LOG_EVERY};
use crate::snapshot::Snapshot;

impl Feed {
    /// Applies one event; whether the snapshot must be rebuilt.
    pub(super) fn on_event(&self, st: &mut State, ev: Event, tx: &mpsc::Sender<Event>) -> bool {
        match ev {
            Event::Ok(kind) => {
                self.answered(st, kind);
                false
            }
            Event::Changed { kind, index, body, reset } => self.on_changed(st, kind, index, &body, reset, tx),
            Event::Failed { kind, error, retry_in } => {
                self.on_failed(st, kind, error, retry_in);
                false
            }
            Event::Dumped(read) => {
                self.on_dumped(st, read, tx);
                false
            }
            Event::Built { inputs, snap, known, took } => self.on_built(st, inputs, snap, known, took, tx),
            Event::Counted { epoch, counts, took } => {
                self.on_counted(st, epoch, counts, took, tx);
                false
            }
            Event::Patched { service, read } => self.on_patched(st, service, read, tx),
            Event::Watched { service, read } => Self::apply_patch(st, service, read),
        }
    }

    /// A request of `kind` succeeded: Consul is reachable (again).
    fn answered(&self, st: &mut State, kind: Kind) {
        let (m, now) = (&self.shared.metrics, Instant::now());
        st.last_ok = Some(now);
        m.consul_ok(now);
        if let Some(pos) = st.failing.iter().position(|(k, _)| *k == kind) {
            st.failing.remove(pos);
            if st.failing.is_empty() {
                tracing::info!(index = self.shared.snapshot.load().index, "Consul answers again; the DNS data follows it again");
                st.stale_logged = None;
            }
        }
        m.feed.consul_up.set(i64::from(st.failing.is_empty()));
    }

    /// A detector's index moved (or its first answer); whether the snapshot must be rebuilt.
    fn on_changed(&self, st: &mut State, kind: Kind, index: u64, body: &[u8], reset: bool, tx: &mpsc::Sender<Event>) -> bool {
        tracing::trace!(watch = kind.name(), index, bytes = body.len(), "Consul index moved");
        self.answered(st, kind);
        if reset {
            tracing::info!(
                watch = kind.name(),
                index,
                "Consul's index went backwards (restarted or restored?); reading the catalog afresh"
            );
            st.reset();
        }
        match kind {
            Kind::Services => {
                st.catalog.wanted |= index > st.dump_index();
                self.on_service_list(st, body, tx);
                false
            }
            Kind::Nodes => {
                st.catalog.wanted |= index > st.dump_index();
                self.on_node_list(st, body, tx);
                false
            }
            Kind::Critical | Kind::Warning => self.on_health(st, kind, index, body, tx),
            Kind::Catalog | Kind::Patch | Kind::Counts => false,
        }
    }

    /// A new service list: the services added, removed or retagged are read alone, and the
    /// instance counts say which service gained or lost an instance.
    fn on_service_list(&self, st: &mut State, body: &[u8], tx: &mpsc::Sender<Event>) {
        st.counts.wanted = true;
        match decode_services(body) {
            Ok(list) => {
                let changed = st.services.as_ref().map(|old| Self::list_diff(old, &list));
                st.services = Some(list);
                self.patch(st, changed.unwrap_or_default(), tx);
            }
            Err(e) => tracing::debug!("decoding /v1/catalog/services: {e}"),
        }
    }

    /// A new node list: a node's address moved or the node left; its services are read alone
    /// (an instance without an address of its own is served at its node's), without waiting
    /// for the full read.
    fn on_node_list(&self, st: &mut State, body: &[u8], tx: &mpsc::Sender<Event>) {
        match decode_node_addresses(body) {
            Ok(nodes) => {
                let moved = st.nodes.as_ref().map(|old| Self::on_moved_nodes(st, old, &nodes));
                st.nodes = Some(nodes);
                self.read_alone(st, moved.unwrap_or_default(), MAX_NODE_PATCHES, tx);
            }
            Err(e) => tracing::debug!("decoding /v1/catalog/nodes: {e}"),
        }
    }

    /// A new list of the checks in one state: the new health overlay, and the services of
    /// instances it names that the snapshot does not know yet, read alone.
    fn on_health(&self, st: &mut State, kind: Kind, index: u64, body: &[u8], tx: &mpsc::Sender<Event>) -> bool {
        let checks = match decode_check_states(body) {
            Ok(checks) => checks,
            Err(e) => {
                self.failed(st, kind, format!("decoding /v1/health/state: {e}"));
                return false;
            }
        };
        let new = Overlay::new(index, checks);
        let old = if kind == Kind::Critical { st.critical.clone() } else { st.warning.clone() };
        let unknown = Self::unknown_in_diff(st, old.as_deref(), &new);
        self.patch(st, unknown, tx);
        let slot = if kind == Kind::Critical { &mut st.critical } else { &mut st.warning };
        *slot = Some(Arc::new(new));
        st.dump.is_some()
    }

    fn on_failed(&self, st: &mut State, kind: Kind, error: String, retry_in: Duration) {
        match kind {
            Kind::Catalog => st.catalog.failed(retry_in),
            Kind::Counts => st.counts.failed(retry_in),
            _ => {}
        }
        tracing::debug!(watch = kind.name(), ?retry_in, "Consul request failed: {error}");
        self.failed(st, kind, error);
    }

    /// A full read is back: built into a snapshot aside (or queued behind the one building).
    fn on_dumped(&self, st: &mut State, read: Read, tx: &mpsc::Sender<Event>) {
        self.answered(st, Kind::Catalog);
        if read.epoch != st.epoch {
            st.catalog.discarded();
            return;
        }
        let took = Duration::from_secs_f64(self.shared.metrics.feed.catalog_read_seconds.get().max(0.0));
        st.catalog.done(took, self.cfg.catalog_read_budget);
        if st.dump.is_none() {
            tracing::info!(
                index = read.index,
                instances = read.endpoints.len(),
                ms = took.as_millis() as u64,
                "first read of the Consul catalog"
            );
        }
        if st.building.is_some() {
            st.queued_dump = Some(read);
        } else {
            self.build_aside(st, read, tx);
        }
    }

    /// A snapshot built aside is back: it becomes the base of the next rebuild (whether
    /// there must be one); a full read queued meanwhile is built next.
    fn on_built(
        &self,
        st: &mut State,
        inputs: Inputs,
        snap: Result<Box<Snapshot>, String>,
        known: HashSet<(String, String)>,
        took: Duration,
        tx: &mpsc::Sender<Event>,
    ) -> bool {
        st.building = None;
        let current = inputs.dump.epoch == st.epoch;
        let installed = match snap {
            Ok(snap) if current => {
                // From now on the new read is the base; patches it covers are dropped.
                st.patches.retain(|_, p| p.index > inputs.dump.index);
                drop_aside(std::mem::replace(&mut st.known, known));
                let patches: Vec<Arc<Read>> = st.patches.values().cloned().collect();
                for p in patches {
                    st.know(&p.endpoints);
                }
                drop_aside(st.dump.replace(inputs.dump.clone()));
                st.ready = Some((inputs, snap, took));
                true
            }
            Ok(_) => false,
            Err(e) => {
                tracing::error!("building the DNS snapshot from a full read failed ({e}); still answering from the previous one");
                st.catalog.wanted = true;
                false
            }
        };
        if let Some(next) = st.queued_dump.take().filter(|r| r.epoch == st.epoch) {
            self.build_aside(st, next, tx);
        }
        installed
    }

    /// The instance counts are back: the services whose count differs from ours are read
    /// alone.
    fn on_counted(&self, st: &mut State, epoch: u64, counts: HashMap<String, u64>, took: Duration, tx: &mpsc::Sender<Event>) {
        self.answered(st, Kind::Counts);
        if epoch != st.epoch {
            st.counts.discarded();
            return;
        }
        st.counts.done(took, self.cfg.catalog_read_budget);
        tracing::debug!(services = counts.len(), ms = took.as_millis() as u64, "read the instance counts");
        let stale = st.dump.as_ref().map(|d| stale_services(d, &st.patches, &counts)).unwrap_or_default();
        if !stale.is_empty() {
            tracing::debug!(services = ?stale, "instance counts differ from the snapshot's; reading those services alone");
        }
        self.patch(st, stale, tx);
    }

    /// A service read alone is back (read again if a change named it meanwhile); whether
    /// the snapshot must be rebuilt.
    fn on_patched(&self, st: &mut State, service: String, read: Result<Read, String>, tx: &mpsc::Sender<Event>) -> bool {
        st.patching.remove(&service);
        if st.repatch.remove(&service) {
            self.patch(st, vec![service.clone()], tx);
        }
        match read {
            Ok(read) => {
                self.answered(st, Kind::Patch);
                Self::apply_patch(st, service, read)
            }
            Err(error) => {
                // The full read scheduled by the same change covers it.
                self.failed(st, Kind::Patch, error);
                false
            }
        }
    }

    /// Puts a service read alone in place of the full read's view of it, if newer than both
    /// that and the service's previous patch; whether the snapshot must be rebuilt.
    fn apply_patch(st: &mut State, service: String, read: Read) -> bool {
        let newer = st.patches.get(&service).is_none_or(|p| read.index > p.index);
        if read.epoch != st.epoch || st.dump.as_ref().is_none_or(|d| read.index <= d.index) || !newer {
            return false;
        }
        tracing::debug!(%service, index = read.index, instances = read.endpoints.len(), "patched one service");
        st.know(&read.endpoints);
        st.patches.insert(service, Arc::new(read));
        true
    }

    pub(super) fn failed(&self, st: &mut State, kind: Kind, error: String) {
        self.shared.metrics.feed.consul_errors.get_or_create(&[("watch", kind.name())]).inc();
        self.shared.metrics.feed.consul_up.set(0);
        let first = st.failing.is_empty();
        match st.failing.iter_mut().find(|(k, _)| *k == kind) {
            Some(entry) => entry.1 = error,
            None => st.failing.push((kind, error)),
        }
        if first {
            self.log_stale(st, true);
        }
    }

    /// Warns that answers come from an old snapshot (at once, then every 30 s while it lasts).
    pub(super) fn log_stale(&self, st: &mut State, first: bool) {
        let Some((kind, error)) = st.failing.first() else { return };
        if !first && st.stale_logged.is_some_and(|t| t.elapsed() < STALE_LOG_EVERY) {
            return;
        }
        st.stale_logged = Some(Instant::now());
        let snap = self.shared.snapshot.load();
        let stale = st.last_ok.map_or(0, |t| t.elapsed().as_secs());
        tracing::warn!(
            watch = kind.name(),
            snapshot_index = snap.index,
            stale_seconds = stale,
            "Consul is not answering ({error}); answering from the last snapshot (index {}, {} services) until it does",
            snap.index,
            snap.stats.services
        );
    }
}
