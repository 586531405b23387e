//! What to read alone and which services to watch alone, from what the detectors and the
//! instance counts say changed.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::detect::hot_watch;
use super::inputs::Overlay;
use super::reads::{read_service, Read};
use super::state::{Event, State};
use super::Feed;

/// At most this many services are patched for one event; beyond, the full read does it.
const MAX_PATCHES: usize = 64;
/// The services of the nodes that moved or left are read alone up to this many (a node
/// leaving is a host going away: its services, even a few hundred, cost Consul less read one
/// by one, ~1.5 ms each, than a full read of a large catalog).
pub(super) const MAX_NODE_PATCHES: usize = 256;
/// A change naming at most this many services makes them hot.
const MAX_HEAT: usize = 8;

/// Services whose number of instances in Consul (`counts`) differs from what the dump and
/// the patches hold, and services they hold instances of that Consul no longer lists.
///
/// Compared with our own view, not with the previous count read: an instance registered and
/// deregistered between two count reads leaves the count unchanged, but not our view of it.
/// An instance the decoders skip (a malformed address) keeps its service differing; it is
/// then read again at each count read, which the budget spaces.
pub(super) fn stale_services(dump: &Read, patches: &HashMap<String, Arc<Read>>, counts: &HashMap<String, u64>) -> Vec<String> {
    let ours =
        |name: &str| patches.get(name).map(|p| p.endpoints.len()).or_else(|| dump.by_service.get(name).map(Vec::len)).unwrap_or(0) as u64;
    let differing = counts.iter().filter(|(name, n)| ours(name) != **n).map(|(name, _)| name.clone());
    let gone =
        dump.by_service.keys().chain(patches.keys()).filter(|name| !name.is_empty() && !counts.contains_key(*name) && ours(name) > 0);
    let mut names: Vec<String> = differing.chain(gone.cloned()).collect();
    names.sort();
    names.dedup();
    names
}

impl Feed {
    /// Reads `services` alone (at most [`MAX_PATCHES`]; more are left to the full read) and
    /// makes them hot: their instances changed.
    pub(super) fn patch(&self, st: &mut State, services: Vec<String>, tx: &mpsc::Sender<Event>) {
        // A few services changing is a deployment or a scaling going on: they will change
        // again. Dozens at once (a bulk registration) would only churn the hot watches.
        if st.dump.is_some() && services.len() <= MAX_HEAT {
            self.heat(st, &services, tx);
        }
        self.read_alone(st, services, MAX_PATCHES, tx);
    }

    /// Reads `services` alone (at most `cap`; more are left to the full read).
    pub(super) fn read_alone(&self, st: &mut State, services: Vec<String>, cap: usize, tx: &mpsc::Sender<Event>) {
        if st.dump.is_none() || services.len() > cap {
            return;
        }
        for service in services {
            if !st.patching.insert(service.clone()) {
                st.repatch.insert(service);
                continue;
            }
            let (client, tx, epoch, slots) = (self.client.clone(), tx.clone(), st.epoch, st.patch_slots.clone());
            tokio::spawn(async move {
                let Ok(_slot) = slots.0.acquire().await else { return };
                let read = read_service(client, service.clone(), epoch).await;
                let _ = tx.send(Event::Patched { service, read }).await;
            });
        }
    }

    /// Makes `services` hot (see the module doc), giving up the least recently changed ones
    /// beyond `hot_services`. The watches given up finish their last request first (see
    /// `hot_watch`); while as many are finishing as `hot_services`, no service is made hot,
    /// so upsync-dns never holds more than twice `hot_services` connections for them.
    pub(super) fn heat(&self, st: &mut State, services: &[String], tx: &mpsc::Sender<Event>) {
        let now = Instant::now();
        // Reap the watches that ended (a JoinSet keeps their results until then).
        while st.hot_tasks.try_join_next().is_some() {}
        for service in services {
            if let Some(entry) = st.hot.get_mut(service) {
                entry.0 = now;
                continue;
            }
            if st.hot_tasks.len() >= 2 * self.cfg.hot_services {
                break;
            }
            if st.hot.len() >= self.cfg.hot_services {
                let coldest = st.hot.iter().min_by_key(|(_, (at, _))| *at).map(|(name, _)| name.clone());
                if let Some((name, (_, retired))) = coldest.and_then(|name| st.hot.remove_entry(&name)) {
                    tracing::debug!(service = %name, "no longer watched alone (changed least recently)");
                    retired.store(true, Ordering::Relaxed);
                }
            }
            let retired = Arc::new(AtomicBool::new(false));
            let (client, name, epoch, tx) = (self.client.clone(), service.clone(), st.epoch, tx.clone());
            tracing::debug!(%service, "watched alone from now on (its instances changed)");
            st.hot_tasks.spawn(hot_watch(client, name, epoch, retired.clone(), tx));
            st.hot.insert(service.clone(), (now, retired));
        }
        self.shared.metrics.feed.hot_services.set(st.hot.len() as i64);
    }

    /// Services named by a change of a health overlay whose instance the snapshot does not
    /// know yet (a new instance turning passing or critical).
    pub(super) fn unknown_in_diff(st: &State, old: Option<&Overlay>, new: &Overlay) -> Vec<String> {
        let in_old = |n: &str, id: &str| old.is_some_and(|o| o.services.get(n).is_some_and(|m| m.contains_key(id)));
        let in_new = |n: &str, id: &str| new.services.get(n).is_some_and(|m| m.contains_key(id));
        let entered = new.entries().filter(|(n, id, _)| !in_old(n, id));
        let left = old.into_iter().flat_map(Overlay::entries).filter(|(n, id, _)| !in_new(n, id));
        let mut names: Vec<String> = entered
            .chain(left)
            .filter(|(n, id, _)| !st.known.contains(&(n.to_string(), id.to_string())))
            .map(|(_, _, name)| name.to_string())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Services with instances on the nodes whose address changed or that left between two
    /// node lists (in the dump or in a patch).
    pub(super) fn on_moved_nodes(st: &State, old: &HashMap<String, String>, new: &HashMap<String, String>) -> Vec<String> {
        let moved: HashSet<&str> = old.iter().filter(|(n, a)| new.get(*n) != Some(*a)).map(|(n, _)| n.as_str()).collect();
        if moved.is_empty() {
            return Vec::new();
        }
        let in_dump = st.dump.iter().flat_map(|d| moved.iter().filter_map(|n| d.by_node.get(*n)).flatten().cloned());
        let in_patches = st
            .patches
            .iter()
            .filter(|(_, p)| p.endpoints.iter().any(|e| e.node.as_deref().is_some_and(|n| moved.contains(n))))
            .map(|(name, _)| name.clone());
        let mut names: Vec<String> = in_dump.chain(in_patches).collect();
        names.sort();
        names.dedup();
        names
    }

    /// Services added, removed or retagged between two service lists.
    pub(super) fn list_diff(old: &BTreeMap<String, Vec<String>>, new: &BTreeMap<String, Vec<String>>) -> Vec<String> {
        let changed = new.iter().filter(|(k, v)| old.get(*k) != Some(*v)).map(|(k, _)| k.clone());
        changed.chain(old.keys().filter(|k| !new.contains_key(*k)).cloned()).collect()
    }
}
