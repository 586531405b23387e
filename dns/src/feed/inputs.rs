//! What a snapshot is built from (a full read, patches, health overlays), and which services
//! differ between two sets of inputs.
use std::collections::{HashMap, HashSet};

use std::sync::Arc;

use upsync_discovery::decode::CheckState;
use upsync_discovery::Endpoint;

use super::reads::Read;
use crate::snapshot::{Health, Instance, Snapshot, ZoneConfig};

/// Non-passing checks of one state, from `/v1/health/state/<state>`.
pub(super) struct Overlay {
    pub(super) index: u64,
    /// node -> service id -> service name, for service checks in that state (nested so a
    /// lookup by `&str` allocates nothing: it runs for every instance at each rebuild).
    pub(super) services: HashMap<String, HashMap<String, String>>,
    /// Nodes with a node-level check in that state.
    pub(super) nodes: HashSet<String>,
}

impl Overlay {
    pub(super) fn new(index: u64, checks: Vec<CheckState>) -> Overlay {
        let mut o = Overlay { index, services: HashMap::new(), nodes: HashSet::new() };
        for c in checks {
            if c.service_id.is_empty() {
                o.nodes.insert(c.node);
            } else {
                o.services.entry(c.node).or_default().insert(c.service_id, c.service_name);
            }
        }
        o
    }

    pub(super) fn covers(&self, node: &str, service_id: &str) -> bool {
        self.nodes.contains(node) || self.services.get(node).is_some_and(|m| m.contains_key(service_id))
    }

    /// `(node, service id, service name)` of every service check in that state.
    pub(super) fn entries(&self) -> impl Iterator<Item = (&str, &str, &str)> {
        self.services.iter().flat_map(|(n, m)| m.iter().map(move |(id, name)| (n.as_str(), id.as_str(), name.as_str())))
    }
}

/// Health of `e`, read at index `read_index`: from the overlays newer than that read, else
/// from the read itself.
pub(super) fn health(e: &Endpoint, read_index: u64, critical: Option<&Overlay>, warning: Option<&Overlay>) -> Health {
    let (node, id) = (e.node.as_deref().unwrap_or(""), e.service_id.as_deref().unwrap_or(""));
    let state = |o: Option<&Overlay>, h: Health| match o.filter(|o| o.index >= read_index) {
        Some(o) => o.covers(node, id),
        None => e.health == h,
    };
    let (critical, warning) = (state(critical, Health::Critical), state(warning, Health::Warning));
    if critical {
        Health::Critical
    } else if warning {
        Health::Warning
    } else {
        Health::Passing
    }
}

pub(super) fn instance(e: &Endpoint, health: Health) -> Instance {
    Instance {
        service: e.service.clone().unwrap_or_default(),
        id: e.service_id.clone().unwrap_or_default(),
        node: e.node.clone().unwrap_or_default(),
        host: e.host.clone(),
        port: e.port,
        tags: e.tags.clone(),
        meta: e.meta.clone(),
        weight: e.weight,
        backup: e.backup,
        down: e.down,
        health,
    }
}

/// What a snapshot is built from.
#[derive(Clone)]
pub(super) struct Inputs {
    pub(super) dump: Arc<Read>,
    /// Services read alone after the dump (only those newer than it).
    pub(super) patches: HashMap<String, Arc<Read>>,
    pub(super) critical: Option<Arc<Overlay>>,
    pub(super) warning: Option<Arc<Overlay>>,
}

/// The instances of `service` as the inputs describe them (a patch if one is newer than the
/// dump, else the dump's).
pub(super) fn service_instances(inp: &Inputs, service: &str) -> Vec<Instance> {
    let (c, w) = (inp.critical.as_deref(), inp.warning.as_deref());
    match inp.patches.get(service) {
        Some(p) => p.endpoints.iter().map(|e| instance(e, health(e, p.index, c, w))).collect(),
        None => {
            let d = &inp.dump;
            let idx = d.by_service.get(service).map(Vec::as_slice).unwrap_or_default();
            idx.iter().map(|&i| &d.endpoints[i]).map(|e| instance(e, health(e, d.index, c, w))).collect()
        }
    }
}

/// Services with an instance whose health may differ between two sets of inputs with the same
/// dump (the overlays changed). When the overlays of both cover the dump (the usual case
/// between two full reads), the difference of the overlays names them directly; otherwise one
/// pass over every instance finds them.
pub(super) fn health_changed(before: &Inputs, after: &Inputs) -> HashSet<String> {
    let same = |a: &Option<Arc<Overlay>>, b: &Option<Arc<Overlay>>| match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    };
    if same(&before.critical, &after.critical) && same(&before.warning, &after.warning) {
        // The same overlays: an instance's health can only differ through its patch, and
        // `patches_changed` names those services (no pass over the 100,000 instances).
        return HashSet::new();
    }
    let covers = |o: Option<&Arc<Overlay>>, present: bool| o.map_or(!present, |o| o.index >= after.dump.index);
    let both = |i: &Inputs| covers(i.critical.as_ref(), true) && covers(i.warning.as_ref(), after.warning.is_some());
    if !(both(before) && both(after)) {
        return health_changed_scan(before, after);
    }
    let mut names: HashSet<String> = after.patches.keys().cloned().collect();
    for (old, new) in [(&before.critical, &after.critical), (&before.warning, &after.warning)] {
        let (Some(old), Some(new)) = (old, new) else { continue };
        let in_set = |o: &Overlay, n: &str, id: &str| o.services.get(n).is_some_and(|m| m.contains_key(id));
        names.extend(new.entries().filter(|(n, id, _)| !in_set(old, n, id)).map(|(_, _, name)| name.to_string()));
        names.extend(old.entries().filter(|(n, id, _)| !in_set(new, n, id)).map(|(_, _, name)| name.to_string()));
        for node in new.nodes.symmetric_difference(&old.nodes) {
            names.extend(after.dump.by_node.get(node).into_iter().flatten().cloned());
        }
    }
    names
}

/// Services whose patch was read, replaced or dropped between two sets of inputs.
pub(super) fn patches_changed(before: &Inputs, after: &Inputs) -> HashSet<String> {
    let differs = |a: &HashMap<String, Arc<Read>>, b: &HashMap<String, Arc<Read>>| {
        a.iter().filter(|(k, p)| b.get(*k).is_none_or(|q| !Arc::ptr_eq(p, q))).map(|(k, _)| k.clone()).collect::<Vec<_>>()
    };
    differs(&after.patches, &before.patches).into_iter().chain(differs(&before.patches, &after.patches)).collect()
}

/// [`health_changed`] by comparing every instance's health: no allocation per instance.
pub(super) fn health_changed_scan(before: &Inputs, after: &Inputs) -> HashSet<String> {
    let mut names = HashSet::new();
    let (c0, w0, c1, w1) = (before.critical.as_deref(), before.warning.as_deref(), after.critical.as_deref(), after.warning.as_deref());
    let mut check = |e: &Endpoint, i0: u64, i1: u64| {
        if health(e, i0, c0, w0) != health(e, i1, c1, w1) {
            names.insert(e.service.clone().unwrap_or_default());
        }
    };
    for e in &after.dump.endpoints {
        check(e, after.dump.index, after.dump.index);
    }
    for (name, p) in &after.patches {
        let i0 = before.patches.get(name).map_or(after.dump.index, |b| b.index);
        for e in &p.endpoints {
            check(e, i0, p.index);
        }
    }
    names
}

pub(super) fn inputs_index(inp: &Inputs) -> u64 {
    [Some(inp.dump.index), inp.critical.as_ref().map(|o| o.index), inp.warning.as_ref().map(|o| o.index)]
        .into_iter()
        .flatten()
        .chain(inp.patches.values().map(|p| p.index))
        .max()
        .unwrap_or(0)
}

pub(super) fn build(zone: Arc<ZoneConfig>, inp: &Inputs) -> Snapshot {
    let (dump, c, w) = (&inp.dump, inp.critical.as_deref(), inp.warning.as_deref());
    let patched = |e: &Endpoint| !inp.patches.is_empty() && inp.patches.contains_key(e.service.as_deref().unwrap_or(""));
    let mut instances: Vec<Instance> =
        dump.endpoints.iter().filter(|e| !patched(e)).map(|e| instance(e, health(e, dump.index, c, w))).collect();
    for p in inp.patches.values() {
        instances.extend(p.endpoints.iter().map(|e| instance(e, health(e, p.index, c, w))));
    }
    Snapshot::build(inputs_index(inp), zone, instances)
}
