//! The feed's rules on captured Consul answers, without a network.
use std::collections::{BTreeMap, HashMap, HashSet};

use upsync_discovery::decode::{decode_health_instances, decode_node_dump, CheckState};

use super::inputs::*;
use super::plan::*;
use super::reads::*;
use super::state::*;
use super::*;
use crate::snapshot::tests::zone;
use crate::snapshot::{Health, Snapshot};

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/../discovery/testdata/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn inputs(critical: Option<Overlay>, warning: Option<Overlay>) -> Inputs {
    let d = decode_node_dump(&fixture("dump_ui_nodes.json")).unwrap();
    Inputs {
        dump: Arc::new(Read::new(100, 0, d.value).indexed()),
        patches: HashMap::new(),
        critical: critical.map(Arc::new),
        warning: warning.map(Arc::new),
    }
}

fn srv(s: &Snapshot, service: &str) -> Vec<String> {
    let mut a = crate::answer::Answer::default();
    let name = hickory_proto::rr::Name::from_ascii(format!("{service}.service.upsync.")).unwrap();
    s.answer(&name, hickory_proto::rr::RecordType::SRV, Default::default(), &mut a);
    let mut v: Vec<String> = a.answers.iter().map(|r| r.data.to_string()).collect();
    v.sort();
    v
}

fn check(node: &str, id: &str, name: &str, health: Health) -> CheckState {
    CheckState { node: node.into(), service_id: id.into(), service_name: name.into(), health }
}

#[test]
fn dump_alone_gives_passing_instances_not_down() {
    let s = build(zone(), &inputs(None, None));
    // web1 (passing), web2 (backup, no check); not web3 (down), web4 (critical), web5 (warning).
    assert_eq!(srv(&s, "web"), ["1 3 8080 127-0-0-5.addr.service.upsync.", "2 1 8081 127-0-0-6.addr.service.upsync."]);
    assert!(srv(&s, "cache").is_empty(), "critical node check");
    assert_eq!(s.index, 100);
}

#[test]
fn newer_overlays_win_older_ones_are_ignored() {
    let critical = Overlay::new(120, vec![check("capture-node", "web1", "web", Health::Critical)]);
    let s = build(zone(), &inputs(Some(critical), Some(Overlay::new(120, vec![]))));
    // web1 now critical; web4 recovered; web5 left warning; the node check cleared.
    let web = srv(&s, "web");
    assert!(web.iter().any(|r| r.contains("8083")) && web.iter().any(|r| r.contains("8084")), "{web:?}");
    assert!(!web.iter().any(|r| r.contains("8080")), "{web:?}");
    assert!(!srv(&s, "cache").is_empty());
    assert_eq!(s.index, 120);
    let s = build(zone(), &inputs(Some(Overlay::new(50, vec![])), Some(Overlay::new(50, vec![]))));
    assert_eq!(srv(&s, "web").len(), 2);
}

#[test]
fn patches_replace_their_service_until_the_next_dump() {
    let mut inp = inputs(None, None);
    let web = decode_health_instances(&fixture("dump_health_web.json")).unwrap().value;
    let mut one = web.into_iter().filter(|e| e.service_id.as_deref() == Some("web1")).collect::<Vec<_>>();
    one[0].port = 9999;
    inp.patches.insert("web".into(), Arc::new(Read::new(130, 0, one)));
    inp.patches.insert("cache".into(), Arc::new(Read::new(131, 0, vec![])));
    let s = build(zone(), &inp);
    assert_eq!(srv(&s, "web"), ["1 3 9999 127-0-0-5.addr.service.upsync."]);
    assert!(srv(&s, "cache").is_empty());
    assert_eq!(s.index, 131);
    // An overlay newer than the patch still applies to it.
    inp.critical = Some(Arc::new(Overlay::new(140, vec![check("capture-node", "web1", "web", Health::Critical)])));
    assert!(srv(&build(zone(), &inp), "web").is_empty());
}

/// The incremental rebuild of what changed between two sets of inputs gives the same
/// answers as a full build.
#[test]
fn incremental_rebuilds_match_full_builds() {
    let mut inp = inputs(Some(Overlay::new(90, vec![])), Some(Overlay::new(90, vec![])));
    let mut snap = build(zone(), &inp);
    let steps = [
        Overlay::new(120, vec![check("capture-node", "web1", "web", Health::Critical)]),
        Overlay::new(130, vec![check("capture-node", "web1", "web", Health::Critical), check("sick-node", "", "", Health::Critical)]),
        Overlay::new(140, vec![]),
    ];
    for new in steps {
        let before = inp.clone();
        inp.critical = Some(Arc::new(new));
        let names = health_changed(&before, &inp);
        assert!(!names.is_empty());
        let changed = names.iter().map(|n| (n.clone(), service_instances(&inp, n))).collect();
        snap = snap.with_services(inputs_index(&inp), changed);
        let full = build(zone(), &inp);
        for svc in ["web", "cache", "api", "db", "pg"] {
            assert_eq!(srv(&snap, svc), srv(&full, svc), "{svc} at index {}", snap.index);
        }
        assert_eq!(snap.stats, full.stats);
    }
    assert!(health_changed(&inp.clone(), &inp).is_empty());
    // Once the overlays cover the dump, their difference names the same services as the scan.
    inp.warning = Some(Arc::new(Overlay::new(140, vec![])));
    let before = inp.clone();
    inp.critical = Some(Arc::new(Overlay::new(
        150,
        vec![check("capture-node", "web5", "web", Health::Critical), check("sick-node", "", "", Health::Critical)],
    )));
    let mut fast: Vec<String> = health_changed(&before, &inp).into_iter().collect();
    let mut scan: Vec<String> = health_changed_scan(&before, &inp).into_iter().collect();
    fast.sort();
    scan.sort();
    assert_eq!(fast, scan);
    assert_eq!(fast, ["cache", "web"]);
}

/// Between two full reads, with the same overlays, only the services whose patch changed
/// are rebuilt (no pass over every instance), and the result matches a full build.
#[test]
fn a_new_patch_alone_names_its_service() {
    let before = inputs(Some(Overlay::new(90, vec![])), None);
    let snap = build(zone(), &before);
    let mut after = before.clone();
    assert!(patches_changed(&before, &after).is_empty() && health_changed(&before, &after).is_empty());
    let web = decode_health_instances(&fixture("dump_health_web.json")).unwrap().value;
    after.patches.insert("web".into(), Arc::new(Read::new(130, 0, web.into_iter().take(1).collect())));
    assert!(health_changed(&before, &after).is_empty(), "same overlays");
    let names = patches_changed(&before, &after);
    assert_eq!(names, HashSet::from(["web".to_string()]));
    let changed = names.iter().map(|n| (n.clone(), service_instances(&after, n))).collect();
    let snap = snap.with_services(inputs_index(&after), changed);
    assert_eq!(srv(&snap, "web"), srv(&build(zone(), &after), "web"));
    // Replacing or dropping a patch names it too.
    let mut later = after.clone();
    later.patches.insert("web".into(), Arc::new(Read::new(131, 0, vec![])));
    assert_eq!(patches_changed(&after, &later), names);
    assert_eq!(patches_changed(&after, &before), names);
}

#[test]
fn instance_counts_that_differ_from_the_snapshot_name_the_services_to_read() {
    // Captured from the same registrations (discovery/testdata/capture-dump.sh).
    let dump = Read::new(10, 0, decode_node_dump(&fixture("dump_ui_nodes.json")).unwrap().value).indexed();
    let counts = upsync_discovery::decode::decode_instance_counts(&fixture("ui_services.json")).unwrap();
    let none = HashMap::new();
    assert!(stale_services(&dump, &none, &counts).is_empty(), "the same catalog: {:?}", stale_services(&dump, &none, &counts));
    let mut changed = counts.clone();
    *changed.get_mut("web").unwrap() += 1;
    changed.remove("db");
    assert_eq!(stale_services(&dump, &none, &changed), ["db", "web"]);
    // A patch is our view of its service: one web instance read alone now.
    let web = dump.by_service["web"][0];
    let patch = Arc::new(Read::new(11, 0, vec![dump.endpoints[web].clone()]));
    let patches = HashMap::from([("web".to_string(), patch)]);
    assert_eq!(stale_services(&dump, &patches, &counts), ["web"]);
    changed.insert("web".into(), 1);
    changed.insert("db".into(), 1);
    assert!(stale_services(&dump, &patches, &changed).is_empty());
}

#[test]
fn nodes_that_moved_or_left_name_their_services() {
    let mut st = State::default();
    let dump = Read::new(10, 0, decode_node_dump(&fixture("dump_ui_nodes.json")).unwrap().value).indexed();
    // A patch holding an instance on ext-node (where db runs in the dump).
    let db = dump.endpoints[dump.by_service["db"][0]].clone();
    st.patches.insert("extra".into(), Arc::new(Read::new(11, 0, vec![db])));
    st.dump = Some(Arc::new(dump));
    let before = upsync_discovery::decode::decode_node_addresses(&fixture("dump_catalog_nodes.json")).unwrap();
    assert!(Feed::on_moved_nodes(&st, &before, &before).is_empty());
    let mut after = before.clone();
    after.insert("ext-node".into(), "10.9.9.9".into());
    after.remove("sick-node");
    after.insert("new-node".into(), "10.9.9.8".into());
    assert_eq!(Feed::on_moved_nodes(&st, &before, &after), ["cache", "db", "extra"]);
}

#[test]
fn diffs_name_the_services_to_patch() {
    let mut st = State::default();
    st.known.insert(("n1".into(), "known".into()));
    let old = Overlay::new(1, vec![check("n1", "known", "a", Health::Critical), check("n1", "new1", "b", Health::Critical)]);
    let new = Overlay::new(2, vec![check("n1", "known", "a", Health::Critical), check("n2", "new2", "c", Health::Critical)]);
    // new1 left the critical set, new2 entered it; neither is known: b and c are read.
    assert_eq!(Feed::unknown_in_diff(&st, Some(&old), &new), ["b", "c"]);
    let list = |v: &[(&str, &[&str])]| {
        v.iter().map(|(k, t)| (k.to_string(), t.iter().map(|s| s.to_string()).collect())).collect::<BTreeMap<_, _>>()
    };
    let before = list(&[("web", &["v1"]), ("api", &[]), ("old", &[])]);
    let after = list(&[("web", &["v1", "v2"]), ("api", &[]), ("new", &[])]);
    assert_eq!(Feed::list_diff(&before, &after), ["new", "web", "old"]);
}

/// At most `hot_services` services are watched on their own; the least recently changed
/// one gives its place up.
#[tokio::test]
async fn the_least_recently_changed_hot_service_gives_its_place_up() {
    let mut cfg = FeedConfig {
        consul: Default::default(),
        wait: Duration::from_secs(1),
        resync_interval: Duration::from_secs(1),
        catalog_read_budget: 0.2,
        hot_services: 2,
    };
    // Nothing listens there: the watches just retry until aborted.
    cfg.consul.addresses = vec!["127.0.0.1:1".parse().unwrap()];
    let shared =
        Arc::new(Shared { snapshot: arc_swap::ArcSwap::from_pointee(Snapshot::empty(zone())), metrics: crate::metrics::Metrics::new() });
    let feed = Feed::new(cfg, zone(), shared.clone()).unwrap();
    let (tx, _rx) = mpsc::channel(8);
    let mut st = State::default();
    let names = |st: &State| {
        let mut v: Vec<String> = st.hot.keys().cloned().collect();
        v.sort();
        v
    };
    feed.heat(&mut st, &["a".into(), "b".into()], &tx);
    // b's change a moment before a's (rather than waiting for the clock to move).
    st.hot.get_mut("b").unwrap().0 -= Duration::from_millis(1);
    feed.heat(&mut st, &["a".into()], &tx);
    feed.heat(&mut st, &["c".into()], &tx);
    assert_eq!(names(&st), ["a", "c"], "b changed least recently");
    assert_eq!(shared.metrics.feed.hot_services.get(), 2);
    // The given-up watch ends after its request under way (here a refused connection and
    // its backoff); the others go on retrying. The bound only catches a watch that never ends.
    let ended = tokio::time::timeout(Duration::from_secs(10), st.hot_tasks.join_next()).await;
    assert!(matches!(ended, Ok(Some(Ok(())))), "the given-up watch still runs: {ended:?}");
    assert_eq!(st.hot_tasks.len(), 2);
    // At most twice `hot_services` watches, counting those finishing: d waits.
    for name in ["d", "e", "f"] {
        feed.heat(&mut st, &[name.into()], &tx);
    }
    assert!(st.hot_tasks.len() <= 4, "{}", st.hot_tasks.len());
}

#[test]
fn spaced_reads_coalesce_and_wait_by_their_cost() {
    let (mut r, mut idle) = (SpacedRead::default(), SpacedRead::default());
    assert!(r.due().is_none(), "nothing wanted");
    r.wanted = true;
    assert!(r.due().is_some_and(|t| t <= tokio::time::Instant::now()), "due at once");
    r.start_beside(&mut idle);
    r.wanted = true;
    assert!(r.due().is_none(), "one in flight: a change meanwhile waits for it");
    // 100 ms at a 20% budget: the next read waits 400 ms.
    r.done(Duration::from_millis(100), 0.2);
    let wait = r.due().unwrap() - tokio::time::Instant::now();
    assert!(wait > Duration::from_millis(350) && wait <= Duration::from_millis(400), "{wait:?}");
    r.start_beside(&mut idle);
    r.failed(Duration::from_secs(1));
    assert!(r.due().unwrap() > tokio::time::Instant::now() + Duration::from_millis(900), "retried after the backoff");
    r.start_beside(&mut idle);
    r.discarded();
    assert!(r.due().is_some_and(|t| t <= tokio::time::Instant::now()), "a discarded answer is read again at once");
}

#[test]
fn a_read_slowed_by_the_other_is_spaced_by_what_it_takes_alone() {
    let (mut counts, mut full) = (SpacedRead::default(), SpacedRead::default());
    let wait = |r: &SpacedRead| r.due().unwrap() - tokio::time::Instant::now();
    counts.start_beside(&mut full);
    counts.done(Duration::from_millis(100), 0.5);
    counts.wanted = true;
    assert!(wait(&counts) > Duration::from_millis(90), "alone: spaced by its own time");
    // A full read starts while the counts are read: the counts take 300 ms, charged as
    // 150 (half: they shared Consul; 100 alone).
    counts.start_beside(&mut full);
    full.start_beside(&mut counts);
    counts.done(Duration::from_millis(300), 0.5);
    counts.wanted = true;
    assert!(wait(&counts) > Duration::from_millis(140) && wait(&counts) <= Duration::from_millis(150), "{:?}", wait(&counts));
    // The full read started beside them too; the next counts read starts beside it.
    full.done(Duration::from_secs(2), 0.5);
    assert!(full.due().is_none() && !full.overlapped);
    full.wanted = true;
    assert!(wait(&full) > Duration::from_millis(1900), "the first full read has no time alone: its own counts");
    full.start_beside(&mut counts);
    counts.start_beside(&mut full);
    // Six times what it took alone (the catalog grew since?): charged half.
    counts.done(Duration::from_millis(600), 0.5);
    counts.wanted = true;
    assert!(wait(&counts) > Duration::from_millis(290) && wait(&counts) <= Duration::from_millis(300), "{:?}", wait(&counts));
}
