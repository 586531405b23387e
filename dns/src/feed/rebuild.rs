//! Building snapshots off the runtime's threads and swapping them in.
use std::collections::HashSet;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;

use super::inputs::{build, health_changed, inputs_index, patches_changed, service_instances, Inputs};
use super::reads::{instance_key, Read};
use super::state::{Event, State};
use super::{drop_aside, Feed};
use crate::snapshot::Snapshot;

impl Feed {
    /// Builds a snapshot from a full read on a blocking thread, while the event loop goes on
    /// applying changes to the snapshot being served (at 100,000 instances a full build takes
    /// about half a second: changes seen meanwhile must not wait for it). `Event::Built`
    /// brings it back; the next rebuild installs it and applies what changed meanwhile.
    pub(super) fn build_aside(&self, st: &mut State, read: Read, tx: &mpsc::Sender<Event>) {
        st.building = Some(read.index);
        let dump = Arc::new(read);
        let patches = st.patches.iter().filter(|(_, p)| p.index > dump.index).map(|(k, p)| (k.clone(), p.clone())).collect();
        let inputs = Inputs { dump, patches, critical: st.critical.clone(), warning: st.warning.clone() };
        let (zone, tx) = (self.zone.clone(), tx.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let aside = inputs.clone();
            let built = tokio::task::spawn_blocking(move || {
                let known = aside.dump.endpoints.iter().map(instance_key).collect();
                (Box::new(build(zone, &aside)), known)
            })
            .await
            .map_err(|e| e.to_string());
            let (snap, known) = match built {
                Ok((snap, known)) => (Ok(snap), known),
                Err(e) => (Err(e), HashSet::new()),
            };
            let _ = tx.send(Event::Built { inputs, snap, known, took: started.elapsed() }).await;
        });
    }

    /// Brings the served snapshot up to date and swaps it in: from a snapshot built aside if
    /// one is ready, else from the one being served, it rebuilds off the runtime only the
    /// services that changed since the inputs of that base (sharing the others), or
    /// everything when nothing can be shared. One swap: answers never go back to the older
    /// state a snapshot built aside started from.
    pub(super) async fn rebuild(&self, st: &mut State) {
        let (current, built_aside) = match st.ready.take() {
            Some((inputs, snap, took)) => {
                if st.built_from.is_none() {
                    tracing::info!(index = snap.index, instances = snap.stats.instances, "first snapshot built from the Consul catalog");
                }
                drop_aside(st.built_from.replace(inputs));
                (Arc::from(snap), Some(took))
            }
            None => (self.shared.snapshot.load_full(), None),
        };
        let Some(dump) = st.dump.clone() else { return };
        let full = std::mem::take(&mut st.full_rebuild);
        let inputs = Inputs { dump, patches: st.patches.clone(), critical: st.critical.clone(), warning: st.warning.clone() };
        let before = st.built_from.replace(inputs.clone());
        let zone = self.zone.clone();
        let started = Instant::now();
        let base = built_aside.is_some().then(|| current.clone());
        let work = move || {
            let Some(before) = before.filter(|b| !full && current.synced && Arc::ptr_eq(&b.dump, &inputs.dump)) else {
                return Some(Arc::new(build(zone, &inputs)));
            };
            let mut names = patches_changed(&before, &inputs);
            names.extend(health_changed(&before, &inputs));
            if names.is_empty() && inputs_index(&inputs) <= current.index {
                // Nothing to change, unless the base itself is new.
                return base;
            }
            let changed = names.into_iter().map(|name| {
                let list = service_instances(&inputs, &name);
                (name, list)
            });
            Some(Arc::new(current.with_services(inputs_index(&inputs).max(current.index), changed.collect())))
        };
        match tokio::task::spawn_blocking(work).await {
            Ok(Some(snap)) => self.install(st, snap, built_aside.unwrap_or_default() + started.elapsed()),
            Ok(None) => {}
            Err(e) => {
                tracing::error!("building the DNS snapshot failed ({e}); still answering from the previous one");
                st.built_from = None;
            }
        }
    }

    /// Swaps `snap` in and updates the metrics.
    pub(super) fn install(&self, st: &State, snap: Arc<Snapshot>, took: Duration) {
        let m = &self.shared.metrics;
        let f = &m.feed;
        f.snapshot_index.set(snap.index.min(i64::MAX as u64) as i64);
        f.services.set(snap.stats.services as i64);
        f.instances.set(snap.stats.instances as i64);
        f.usable_instances.set(snap.stats.usable as i64);
        f.snapshot_builds.inc();
        f.snapshot_swapped.set(SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64));
        m.snapshot_built(snap.built);
        tracing::debug!(
            index = snap.index,
            services = snap.stats.services,
            instances = snap.stats.instances,
            usable = snap.stats.usable,
            patches = st.patches.len(),
            ms = took.as_millis() as u64,
            "snapshot swapped in"
        );
        if snap.stats.unnamable > 0 {
            tracing::debug!(
                count = snap.stats.unnamable,
                "service names or tags that cannot be a DNS label (dots, over 63 bytes) are not served"
            );
        }
        drop_aside(self.shared.snapshot.swap(snap));
    }
}
