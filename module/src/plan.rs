//! The watch plan: how the leader covers every synced upstream with a bounded number of
//! Consul connections (`upsync_consul_connections`, module/README.md "Many upstreams").
//!
//! Upstreams that reach Consul the same way (addresses, token, TLS, datacenter, consistency,
//! body limit) share one client, and that client never holds more than the configured number of
//! connections. Each blocking query holds one connection for its whole wait, so the plan makes
//! at most that many queries per client:
//!
//! - while the upstreams fit, each keeps a blocking query of its own (`Single`): it wakes only
//!   when its own servers change, the cheapest for Consul;
//! - beyond, KV upstreams are served by recursive queries on a folder above them (`KvTree`),
//!   split by prefix on arrival: the deepest folders are lifted one level at a time, and
//!   folders that meet are merged, until the count fits (`upstreams/a`, `upstreams/b`, ...
//!   become one query on `upstreams`);
//! - if KV folders alone cannot make room, the catalog and health upstreams share one query on
//!   Consul's node dump (`Catalog`, `/v1/internal/ui/nodes`), split by service;
//! - last, the KV folders are lifted to the root of the store (one query for every KV upstream).
//!
//! The plan is pure (no I/O): tested here without Consul or nginx.
use crate::conf::{Source, UpstreamSync};
pub use crate::conf::{DEFAULT_CONNECTIONS, MAX_CONNECTIONS, MIN_CONNECTIONS};
use crate::poller::WatchSpec;

/// One blocking query and the upstreams it serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UnitKind {
    /// The upstream's own query (its KV prefix, catalog or health service).
    Single,
    /// `/v1/kv/ROOT?recurse`, split by the members' prefixes.
    KvTree { root: String },
    /// `/v1/internal/ui/nodes`, split by the members' services.
    Catalog,
}

#[derive(Clone, Debug)]
pub struct Unit {
    pub kind: UnitKind,
    pub members: Vec<WatchSpec>,
}

/// Upstreams sharing one Consul client (`sync`: the first member's settings, which all share
/// as far as the client is concerned) and their queries.
#[derive(Clone, Debug)]
pub struct Group {
    pub sync: UpstreamSync,
    pub units: Vec<Unit>,
}

/// Whether two upstreams can share a client: same addresses, credentials and read options.
/// An etcd upstream never does: it has a watch of its own (see [`crate::poller`]).
fn same_client(a: &UpstreamSync, b: &UpstreamSync) -> bool {
    let etcd = |s: &UpstreamSync| s.upsync.as_ref().is_some_and(|u| matches!(u.source, Source::Etcd { .. }));
    if etcd(a) || etcd(b) {
        return false;
    }
    match (&a.upsync, &b.upsync) {
        (Some(x), Some(y)) => {
            x.addresses == y.addresses
                && x.datacenter == y.datacenter
                && x.consistency == y.consistency
                && x.max_body == y.max_body
                && a.token == b.token
                && a.tls == b.tls
        }
        _ => false,
    }
}

/// The KV folder an upstream reads (`upstreams/app` for `/v1/kv/upstreams/app/`).
fn kv_dir(spec: &WatchSpec) -> Option<String> {
    match &spec.sync.upsync.as_ref()?.source {
        Source::Kv { prefix } => Some(prefix.trim_matches('/').to_string()),
        _ => None,
    }
}

fn parent(dir: &str) -> String {
    dir.rsplit_once('/').map(|(p, _)| p.to_string()).unwrap_or_default()
}

fn depth(dir: &str) -> usize {
    if dir.is_empty() {
        0
    } else {
        dir.split('/').count()
    }
}

/// Plans the queries of `specs` with at most `connections` (at least [`MIN_CONNECTIONS`]) per
/// client.
pub fn plan(specs: Vec<WatchSpec>, connections: usize) -> Vec<Group> {
    let budget = connections.max(MIN_CONNECTIONS);
    let mut groups: Vec<(UpstreamSync, Vec<WatchSpec>)> = Vec::new();
    for spec in specs {
        if spec.sync.upsync.is_none() {
            continue;
        }
        match groups.iter_mut().find(|(sync, _)| same_client(sync, &spec.sync)) {
            Some((_, members)) => members.push(spec),
            None => groups.push((spec.sync.clone(), vec![spec])),
        }
    }
    groups.into_iter().map(|(sync, members)| Group { sync, units: plan_group(members, budget) }).collect()
}

/// Folders being lifted: (query root, members).
type Folders = Vec<(String, Vec<WatchSpec>)>;

fn plan_group(members: Vec<WatchSpec>, budget: usize) -> Vec<Unit> {
    let (kv, catalog): (Vec<WatchSpec>, Vec<WatchSpec>) = members.into_iter().partition(|s| kv_dir(s).is_some());
    let mut folders: Folders = kv.into_iter().map(|s| (kv_dir(&s).unwrap_or_default(), vec![s])).collect();
    let mut catalog_merged = false;
    let count = |folders: &Folders, merged: bool| folders.len() + if merged { 1.min(catalog.len()) } else { catalog.len() };
    // 1. Lift KV folders while that keeps them below the root of the store.
    while count(&folders, catalog_merged) > budget && lift(&mut folders, 2) {}
    // 2. The catalog and health upstreams share the node dump.
    if count(&folders, catalog_merged) > budget && catalog.len() >= 2 {
        catalog_merged = true;
    }
    // 3. Up to the root of the store.
    while count(&folders, catalog_merged) > budget && lift(&mut folders, 1) {}
    let mut units: Vec<Unit> = folders
        .into_iter()
        .map(|(root, members)| {
            // A folder with a single upstream reads that upstream's own prefix: cheaper.
            if members.len() == 1 {
                Unit { kind: UnitKind::Single, members }
            } else {
                Unit { kind: UnitKind::KvTree { root }, members }
            }
        })
        .collect();
    if catalog_merged {
        units.push(Unit { kind: UnitKind::Catalog, members: catalog });
    } else {
        units.extend(catalog.into_iter().map(|s| Unit { kind: UnitKind::Single, members: vec![s] }));
    }
    units
}

/// Lifts the deepest folders (of depth at least `min_depth`) one level and merges the folders
/// that then meet. False when no folder is that deep.
fn lift(folders: &mut Folders, min_depth: usize) -> bool {
    let Some(deepest) = folders.iter().map(|(root, _)| depth(root)).max() else { return false };
    if deepest < min_depth {
        return false;
    }
    let mut out: Folders = Vec::with_capacity(folders.len());
    for (root, members) in folders.drain(..) {
        let root = if depth(&root) == deepest { parent(&root) } else { root };
        match out.iter_mut().find(|(r, _)| *r == root) {
            Some((_, m)) => m.extend(members),
            None => out.push((root, members)),
        }
    }
    *folders = out;
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conf::{parse_upsync, Token};

    fn spec(id: usize, target: &str, extra: &[&str]) -> WatchSpec {
        let mut args = vec![target];
        args.extend_from_slice(extra);
        let sync = UpstreamSync { upsync: Some(parse_upsync(&args).unwrap()), ..Default::default() };
        WatchSpec { id, upstream: format!("u{id}"), sync, known: None }
    }

    fn kv(id: usize, prefix: &str) -> WatchSpec {
        spec(id, &format!("127.0.0.1:8500/v1/kv/{prefix}"), &[])
    }

    fn health(id: usize, name: &str) -> WatchSpec {
        spec(id, &format!("127.0.0.1:8500/v1/health/service/{name}"), &["upsync_type=consul_health"])
    }

    fn shape(groups: &[Group]) -> Vec<Vec<(UnitKind, Vec<usize>)>> {
        groups.iter().map(|g| g.units.iter().map(|u| (u.kind.clone(), u.members.iter().map(|m| m.id).collect())).collect()).collect()
    }

    #[test]
    fn upstreams_that_fit_keep_their_own_queries() {
        let g = plan(vec![kv(0, "upstreams/a"), kv(1, "upstreams/b"), health(2, "web")], 4);
        assert_eq!(shape(&g), vec![vec![(UnitKind::Single, vec![0]), (UnitKind::Single, vec![1]), (UnitKind::Single, vec![2])]]);
    }

    #[test]
    fn many_kv_upstreams_share_their_folder_and_catalog_ones_the_node_dump() {
        let mut specs: Vec<WatchSpec> = (0..1000).map(|i| kv(i, &format!("upstreams/app{i}/"))).collect();
        specs.extend((1000..1200).map(|i| health(i, &format!("svc{i}"))));
        let g = plan(specs, 4);
        assert_eq!(g.len(), 1);
        let units = &g[0].units;
        assert_eq!(units.len(), 2, "{:?}", shape(&g));
        assert_eq!(units[0].kind, UnitKind::KvTree { root: "upstreams".into() });
        assert_eq!(units[0].members.len(), 1000);
        assert_eq!(units[1].kind, UnitKind::Catalog);
        assert_eq!(units[1].members.len(), 200);
    }

    #[test]
    fn folders_are_lifted_deepest_first_and_only_as_far_as_needed() {
        let specs = vec![
            kv(0, "teams/a/web"),
            kv(1, "teams/a/api"),
            kv(2, "teams/b/web"),
            kv(3, "teams/b/api"),
            kv(4, "other/x"),
            health(5, "one"),
        ];
        // 6 queries do not fit in 4: teams/a and teams/b each become one, other/x stays alone.
        let g = plan(specs.clone(), 4);
        assert_eq!(
            shape(&g),
            vec![vec![
                (UnitKind::KvTree { root: "teams/a".into() }, vec![0, 1]),
                (UnitKind::KvTree { root: "teams/b".into() }, vec![2, 3]),
                (UnitKind::Single, vec![4]),
                (UnitKind::Single, vec![5]),
            ]]
        );
        // In 3, teams is one query.
        let g = plan(specs.clone(), 3);
        assert_eq!(
            shape(&g),
            vec![vec![
                (UnitKind::KvTree { root: "teams".into() }, vec![0, 1, 2, 3]),
                (UnitKind::Single, vec![4]),
                (UnitKind::Single, vec![5])
            ]]
        );
        // In 2 (the least), every KV upstream is read from the root of the store.
        let g = plan(specs, 1);
        assert_eq!(shape(&g), vec![vec![(UnitKind::KvTree { root: "".into() }, vec![0, 1, 2, 3, 4]), (UnitKind::Single, vec![5])]]);
    }

    #[test]
    fn the_node_dump_comes_before_the_root_of_the_store() {
        let specs = vec![kv(0, "a"), kv(1, "b"), health(2, "x"), health(3, "y")];
        let g = plan(specs, 3);
        assert_eq!(shape(&g), vec![vec![(UnitKind::Single, vec![0]), (UnitKind::Single, vec![1]), (UnitKind::Catalog, vec![2, 3])]]);
    }

    #[test]
    fn etcd_upstreams_each_keep_a_watch_of_their_own() {
        let etcd = |id: usize, prefix: &str| spec(id, &format!("127.0.0.1:2379/v3/kv/{prefix}"), &["upsync_type=etcd"]);
        let specs = vec![etcd(0, "upstreams/a"), etcd(1, "upstreams/b"), kv(2, "upstreams/c"), etcd(3, "upstreams/d")];
        let g = plan(specs, 2);
        assert_eq!(
            shape(&g),
            vec![
                vec![(UnitKind::Single, vec![0])],
                vec![(UnitKind::Single, vec![1])],
                vec![(UnitKind::Single, vec![2])],
                vec![(UnitKind::Single, vec![3])]
            ]
        );
    }

    #[test]
    fn upstreams_reaching_consul_differently_get_their_own_clients() {
        let mut other_token = kv(1, "upstreams/b");
        other_token.sync.token = Some(Token::Value("t".into()));
        let specs = vec![kv(0, "upstreams/a"), other_token, spec(2, "127.0.0.2:8500/v1/kv/upstreams/c", &[]), kv(3, "upstreams/d")];
        let g = plan(specs, 4);
        assert_eq!(
            shape(&g),
            vec![
                vec![(UnitKind::Single, vec![0]), (UnitKind::Single, vec![3])],
                vec![(UnitKind::Single, vec![1])],
                vec![(UnitKind::Single, vec![2])]
            ]
        );
    }
}
