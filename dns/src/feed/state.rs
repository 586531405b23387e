//! The feed loop's state and the events that change it.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use upsync_discovery::Endpoint;

use super::detect::Kind;
use super::inputs::{Inputs, Overlay};
use super::reads::{instance_key, PatchSlots, Read, SpacedRead};
use crate::snapshot::Snapshot;

pub(super) enum Event {
    /// A detector's index moved (or its first answer): its index and body. `reset`: the
    /// index went backwards (a restarted dev agent, a restored snapshot, a lagging server).
    Changed {
        kind: Kind,
        index: u64,
        body: Bytes,
        reset: bool,
    },
    /// A request succeeded (Consul is reachable).
    Ok(Kind),
    Failed {
        kind: Kind,
        error: String,
        retry_in: Duration,
    },
    Dumped(Read),
    /// A snapshot built aside from a full read (see `Feed::build_aside`), in `took`, with
    /// the `(node, service id)` of every instance of that read.
    Built {
        inputs: Inputs,
        snap: Result<Box<Snapshot>, String>,
        known: HashSet<(String, String)>,
        took: Duration,
    },
    Patched {
        service: String,
        read: Result<Read, String>,
    },
    /// A hot service's blocking query saw its index move.
    Watched {
        service: String,
        read: Read,
    },
    /// Instances per service (`/v1/internal/ui/services`), read in `epoch`, in `took`.
    Counted {
        epoch: u64,
        counts: HashMap<String, u64>,
        took: Duration,
    },
}

#[derive(Default)]
pub(super) struct State {
    pub(super) dump: Option<Arc<Read>>,
    /// The inputs the snapshot being served was built from.
    pub(super) built_from: Option<Inputs>,
    pub(super) patches: HashMap<String, Arc<Read>>,
    /// `(node, service id)` of every instance the dump and patches know.
    pub(super) known: HashSet<(String, String)>,
    /// Hot services: when each was last named by a change, and its blocking query.
    pub(super) hot: HashMap<String, (Instant, Arc<AtomicBool>)>,
    /// The hot watches, and those given up that are finishing their last request.
    pub(super) hot_tasks: tokio::task::JoinSet<()>,
    /// Permits for patch reads (`PATCHES_IN_FLIGHT`).
    pub(super) patch_slots: PatchSlots,
    /// Services being read alone, and those to read again once that read is back.
    pub(super) patching: HashSet<String>,
    pub(super) repatch: HashSet<String>,
    pub(super) critical: Option<Arc<Overlay>>,
    pub(super) warning: Option<Arc<Overlay>>,
    /// The service list of the last `/v1/catalog/services` answer.
    pub(super) services: Option<BTreeMap<String, Vec<String>>>,
    /// Node name -> address, from the last `/v1/catalog/nodes` answer.
    pub(super) nodes: Option<HashMap<String, String>>,
    /// Reads of the instance counts (`/v1/internal/ui/services`), wanted when the service
    /// list's index moves.
    pub(super) counts: SpacedRead,
    /// The next rebuild must build everything (Consul's index went backwards).
    pub(super) full_rebuild: bool,
    /// Index of the full read being built into a snapshot aside, if one is; a full read
    /// that arrived meanwhile waits for it.
    pub(super) building: Option<u64>,
    pub(super) queued_dump: Option<Read>,
    /// A snapshot built aside, to install at the next rebuild with the inputs it came from.
    pub(super) ready: Option<(Inputs, Box<Snapshot>, Duration)>,
    /// Full reads of the catalog, wanted when a detector saw a change the dump does not have.
    pub(super) catalog: SpacedRead,
    /// Incremented when Consul's index goes backwards: reads started before belong to the
    /// old data and are discarded, and the overlays and patches are dropped (the next read
    /// carries the check states anyway).
    pub(super) epoch: u64,
    /// Detectors whose last request failed, with the error.
    pub(super) failing: Vec<(Kind, String)>,
    pub(super) stale_logged: Option<Instant>,
    pub(super) last_ok: Option<Instant>,
}

impl State {
    /// Index of the newest full read, served or being built.
    pub(super) fn dump_index(&self) -> u64 {
        self.dump.as_ref().map_or(0, |d| d.index).max(self.building.unwrap_or(0))
    }

    /// Consul's index went backwards (a restarted dev agent, a restored snapshot): what was
    /// read before belongs to the old data. The hot watches are given up, the overlays,
    /// patches and lists dropped, and the catalog read afresh and rebuilt whole.
    pub(super) fn reset(&mut self) {
        self.epoch += 1;
        for (_, (_, retired)) in self.hot.drain() {
            retired.store(true, Ordering::Relaxed);
        }
        self.critical = None;
        self.warning = None;
        self.patches.clear();
        self.services = None;
        self.nodes = None;
        self.catalog.wanted = true;
        self.full_rebuild = true;
    }

    pub(super) fn know(&mut self, endpoints: &[Endpoint]) {
        self.known.extend(endpoints.iter().map(instance_key));
    }
}
