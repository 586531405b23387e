//! Makes Consul match the desired state, one queued endpoint id at a time, and reconciles:
//! reads back what this node owns in Consul at start and every resync interval, and queues
//! whatever differs.
//!
//! Writes per endpoint: one KV transaction (the upsync entry and the ownership record, so they
//! never disagree) and the agent service calls (register, maintenance, deregister). Adding:
//! KV first, then the service. Removing: KV first (nginx stops sending at once), then the
//! service. A transient failure (Consul unreachable, 5xx) puts the id back at the head of the
//! queue and the applier waits with exponential backoff; the ids behind it keep their order.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;
use tokio::time::Instant;
use upsync_discovery::{Backoff, Client, Error, Method};

use crate::config::Settings;
use crate::model::{META_HASH, META_NODE};
use crate::state::{Shared, Written, WrittenKv, WrittenService};
use crate::target::{Record, Target};

/// One operation of a Consul KV transaction (`PUT /v1/txn`).
#[derive(Clone, Debug, PartialEq, Eq)]
enum KvOp {
    Set {
        key: String,
        value: String,
    },
    Delete {
        key: String,
    },
    /// Only if the entry's ModifyIndex is still `index`.
    DeleteCas {
        key: String,
        index: u64,
    },
}

impl KvOp {
    fn to_json(&self) -> serde_json::Value {
        let b64 = |v: &str| base64::engine::general_purpose::STANDARD.encode(v);
        match self {
            KvOp::Set { key, value } => serde_json::json!({"KV": {"Verb": "set", "Key": key, "Value": b64(value)}}),
            KvOp::Delete { key } => serde_json::json!({"KV": {"Verb": "delete", "Key": key}}),
            KvOp::DeleteCas { key, index } => {
                serde_json::json!({"KV": {"Verb": "delete-cas", "Key": key, "Index": index}})
            }
        }
    }
}

#[derive(Deserialize)]
struct TxnResponse {
    #[serde(rename = "Results", default)]
    results: Option<Vec<TxnResult>>,
}

#[derive(Deserialize)]
struct TxnResult {
    #[serde(rename = "KV")]
    kv: Option<TxnKv>,
}

#[derive(Deserialize)]
struct TxnKv {
    #[serde(rename = "Key")]
    key: String,
    #[serde(rename = "ModifyIndex", default)]
    modify_index: u64,
}

/// Runs `ops` atomically; returns the ModifyIndex of each key set. Consul answers 409 when a
/// CAS operation fails (then nothing was applied).
async fn txn(client: &Client, ops: &[KvOp]) -> Result<HashMap<String, u64>, Error> {
    if ops.is_empty() {
        return Ok(HashMap::new());
    }
    let body = serde_json::Value::Array(ops.iter().map(KvOp::to_json).collect()).to_string();
    let r = client.request(Method::PUT, "/v1/txn", Some(body.into()), None).await?;
    let parsed: TxnResponse = serde_json::from_slice(&r.body).unwrap_or(TxnResponse { results: None });
    Ok(parsed.results.unwrap_or_default().into_iter().filter_map(|r| r.kv).map(|kv| (kv.key, kv.modify_index)).collect())
}

/// The KV half of [`apply`]: the upsync KV entry and the ownership record, in one transaction.
/// Returns what Consul holds of them afterwards, None when it already held `t`'s.
async fn write_kv(
    client: &Client,
    id: &str,
    t: &Target,
    w: &Written,
) -> Result<Option<(Option<WrittenKv>, Option<(String, String)>)>, Error> {
    if w.kv_matches(t) && w.record == t.record {
        return Ok(None);
    }
    let mut ops = Vec::new();
    if let Some(old) = &w.kv {
        let kept = t.kv.as_ref().is_some_and(|(k, _)| *k == old.key);
        if !kept {
            ops.push(if old.index > 0 {
                KvOp::DeleteCas { key: old.key.clone(), index: old.index }
            } else {
                KvOp::Delete { key: old.key.clone() }
            });
        }
    }
    if let Some((k, v)) = &t.kv {
        if !w.kv_matches(t) {
            ops.push(KvOp::Set { key: k.clone(), value: v.clone() });
        }
    }
    match (&t.record, &w.record) {
        (Some(r), cur) if cur.as_ref() != Some(r) => ops.push(KvOp::Set { key: r.0.clone(), value: r.1.clone() }),
        (None, Some((k, _))) => ops.push(KvOp::Delete { key: k.clone() }),
        _ => {}
    }
    let indexes = match txn(client, &ops).await {
        Err(e) if e.status() == Some(409) && ops.iter().any(|o| matches!(o, KvOp::DeleteCas { .. })) => {
            // Someone else rewrote the entry since we wrote it: it is theirs now.
            let old = w.kv.as_ref().map(|k| k.key.clone()).unwrap_or_default();
            tracing::warn!(id, key = %old, "KV entry was rewritten by someone else since this node wrote it; leaving it in place");
            ops.retain(|o| !matches!(o, KvOp::DeleteCas { .. }));
            txn(client, &ops).await
        }
        r => r,
    }?;
    let kv = t.kv.as_ref().map(|(k, v)| WrittenKv {
        key: k.clone(),
        value: v.clone(),
        index: indexes.get(k).copied().or_else(|| w.kv.as_ref().filter(|o| &o.key == k).map(|o| o.index)).unwrap_or(0),
    });
    Ok(Some((kv, t.record.clone())))
}

/// Makes Consul hold `t` for `id`, given that it holds `w`. Returns what it holds afterwards;
/// on error, also what was done before the error.
///
/// The KV transaction and a (re-)registration of the agent service go out together: they are
/// independent writes (the ownership record names the entry, the service carries the node id),
/// and a registration's latency is then the slower of the two, not their sum.
async fn apply(client: &Client, id: &str, t: &Target, mut w: Written) -> Result<Written, (Written, Error)> {
    let register = match (&t.service, &w.service) {
        (Some(st), cur) if cur.as_ref().is_none_or(|c| c.hash != st.hash) => Some(st),
        _ => None,
    };
    let registering = async {
        match register {
            Some(st) => client.register_service(&st.registration).await.map(|()| true),
            None => Ok(false),
        }
    };
    let (kv, registered_now) = tokio::join!(write_kv(client, id, t, &w), registering);
    let mut failed = None;
    match kv {
        Ok(Some((kv, record))) => {
            w.kv = kv;
            w.record = record;
        }
        Ok(None) => {}
        Err(e) => failed = Some(e),
    }
    match (registered_now, register) {
        (Ok(true), Some(st)) => {
            let was_in_maintenance = w.service.as_ref().is_some_and(|c| c.maintenance);
            w.service = Some(WrittenService { hash: st.hash.clone(), maintenance: was_in_maintenance });
        }
        (Ok(_), _) => {}
        (Err(e), _) => {
            failed.get_or_insert(e);
        }
    }
    if let Some(e) = failed {
        return Err((w, e));
    }

    // The agent service's maintenance state, or its removal.
    match (&t.service, &w.service) {
        (Some(st), _) => {
            let registered = register.is_none();
            let want = st.maintenance.is_some();
            let have = w.service.as_ref().is_some_and(|c| c.maintenance);
            // After a (re-)registration the maintenance state is stated again either way.
            if want != have || (!registered && want) {
                match client.service_maintenance(id, want, st.maintenance.as_deref()).await {
                    Ok(()) => {}
                    Err(e) if e.status() == Some(404) => {
                        // The service vanished (agent restarted): register it again next time.
                        w.service = None;
                        return Err((w, e));
                    }
                    Err(e) => return Err((w, e)),
                }
                w.service = Some(WrittenService { hash: st.hash.clone(), maintenance: want });
            }
        }
        (None, Some(_)) => {
            match client.deregister_service(id).await {
                Ok(()) => {}
                Err(e) if e.status() == Some(404) => {} // already gone
                Err(e) => return Err((w, e)),
            }
            w.service = None;
        }
        (None, None) => {}
    }
    Ok(w)
}

/// What this node owns in Consul: ownership records, agent services carrying its node id,
/// and the KV entries the records name.
async fn read_reality(client: &Client, s: &Settings) -> Result<(HashMap<String, (Written, Option<Record>)>, Vec<String>), Error> {
    let mut out: HashMap<String, (Written, Option<Record>)> = HashMap::new();
    let prefix = s.records_prefix();
    let mut kv_keys: Vec<(String, String)> = Vec::new(); // (id, key)
    let records = client.kv_list(&prefix).await?;
    let services = client.agent_services().await?;
    let mut invalid = Vec::new();
    for pair in records {
        let Some(id) = pair.key.strip_prefix(&prefix).filter(|id| !id.is_empty() && !id.contains('/')) else {
            continue;
        };
        let raw = String::from_utf8_lossy(&pair.value).to_string();
        let rec: Option<Record> = match serde_json::from_str(&raw) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(key = %pair.key, "unreadable ownership record ({e}); it will be removed");
                None
            }
        };
        if let Some(why) = rec.as_ref().and_then(|r| invalid_record(r, id, s, &services)) {
            // Acting on it could delete or overwrite what another node (or someone else)
            // owns: reported, left in place, never used.
            tracing::error!(key = %pair.key, "ownership record not used: {why}; remove it once checked (consul kv delete {})", pair.key);
            invalid.push(format!("{}: {why}", pair.key));
            continue;
        }
        if let Some(k) = rec.as_ref().and_then(|r| r.kv_key.clone()) {
            kv_keys.push((id.to_string(), k));
        }
        let entry = out.entry(id.to_string()).or_default();
        entry.0.record = Some((pair.key.clone(), raw));
        entry.1 = rec;
    }

    let ours: Vec<_> = services.values().filter(|svc| svc.meta.get(META_NODE) == Some(&s.node_id)).collect();
    if !ours.is_empty() {
        let checks = client.agent_checks().await?;
        let in_maintenance: HashSet<&str> = checks.values().filter_map(|c| c.id.strip_prefix("_service_maintenance:")).collect();
        for svc in ours {
            let entry = out.entry(svc.id.clone()).or_default();
            entry.0.service = Some(WrittenService {
                hash: svc.meta.get(META_HASH).cloned().unwrap_or_default(),
                maintenance: in_maintenance.contains(svc.id.as_str()),
            });
        }
    }

    // The KV entries the records name, read per service folder (one request per service).
    let mut folders: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for (id, key) in kv_keys {
        let folder = match key.rfind('/') {
            Some(i) => key[..=i].to_string(),
            None => key.clone(),
        };
        folders.entry(folder).or_default().push((id, key));
    }
    for (folder, wanted) in folders {
        let pairs: HashMap<String, (String, u64)> = client
            .kv_list(&folder)
            .await?
            .into_iter()
            .map(|p| (p.key, (String::from_utf8_lossy(&p.value).to_string(), p.modify_index)))
            .collect();
        for (id, key) in wanted {
            if let Some((value, index)) = pairs.get(&key) {
                out.entry(id).or_default().0.kv = Some(WrittenKv { key, value: value.clone(), index: *index });
            }
        }
    }
    Ok((out, invalid))
}

/// Why an ownership record must not be acted on, if it must not: it names another id than its
/// key, a KV entry outside `PREFIX/SERVICE/`, or an agent service another node (or nobody
/// through the sidecar) registered.
fn invalid_record(r: &Record, id: &str, s: &Settings, services: &BTreeMap<String, upsync_discovery::AgentService>) -> Option<String> {
    if r.spec.id != id {
        return Some(format!("it describes endpoint `{}`, not `{id}`", r.spec.id));
    }
    if let Some(k) = &r.kv_key {
        let folder = format!("{}/{}/", s.kv_prefix, r.spec.service);
        let rest = k.strip_prefix(&folder);
        if rest.is_none_or(|rest| rest.is_empty() || rest.contains('/')) {
            return Some(format!("its KV key `{k}` is outside this sidecar's folder {folder}"));
        }
    }
    if let Some(svc) = services.get(id) {
        let owner = svc.meta.get(META_NODE);
        if owner != Some(&s.node_id) {
            let who = owner.map(|o| format!("node `{o}`")).unwrap_or_else(|| "someone else (no upsync-node meta)".into());
            return Some(format!("agent service `{id}` belongs to {who}, not to this node"));
        }
    }
    None
}

/// Reconciles once: returns how many endpoint ids were queued.
pub async fn reconcile(shared: &Arc<Shared>, client: &Client) -> Result<usize, Error> {
    let (reality, invalid) = read_reality(client, &shared.settings).await?;
    shared.set_invalid_records(invalid);
    let queued = shared.reconcile(reality);
    forget_settled_calls(shared).await;
    Ok(queued)
}

/// The applier task: runs forever.
pub async fn run(shared: Arc<Shared>, client: Client) {
    let backoff = Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(10) };
    let mut rng = fastrand::Rng::new();
    let mut failures: u32 = 0;
    let mut next_reconcile = Instant::now();
    // Per endpoint: consecutive refusals of its change (its own backoff).
    let mut endpoint_failures: HashMap<String, u32> = HashMap::new();
    loop {
        if !shared.lock_held() {
            // Another sidecar may own this node id: write nothing, delete nothing.
            shared.wait_for_work().await;
            continue;
        }
        if Instant::now() >= next_reconcile || shared.take_reconcile_request() {
            match reconcile(&shared, &client).await {
                Ok(queued) => {
                    if failures > 0 {
                        tracing::info!(address = %client.current_address(), "Consul reachable again");
                    }
                    failures = 0;
                    shared.set_consul_status(true, None);
                    if queued > 0 {
                        tracing::info!(changes = queued, "reconcile: Consul differs from this node's endpoints; fixing");
                    } else {
                        tracing::debug!("reconcile: Consul matches this node's endpoints");
                    }
                    next_reconcile = Instant::now() + shared.settings.resync;
                }
                Err(e) => {
                    // Retried after a backoff; queued changes are still tried meanwhile (a
                    // token that may write but not list must not block them).
                    failures += 1;
                    let delay = backoff.delay(failures, &mut rng);
                    report_failure(&shared, &e, failures, delay, "reconciling");
                    next_reconcile = Instant::now() + delay;
                    if e.is_transient() && shared.queue_len() == 0 {
                        tokio::time::sleep(delay).await;
                        continue;
                    }
                }
            }
        }
        let Some((id, t, w)) = shared.next_change() else {
            tokio::select! {
                _ = shared.wait_for_work() => {}
                _ = tokio::time::sleep_until(next_reconcile) => {}
            }
            continue;
        };
        match apply(&client, &id, &t, w).await {
            Ok(w) => {
                log_change(&id, &t, &w);
                shared.set_written(&id, w);
                shared.set_failed(&id, None);
                endpoint_failures.remove(&id);
                forget_settled_calls(&shared).await;
                if failures > 0 {
                    failures = 0;
                    tracing::info!(pending = shared.queue_len(), "Consul reachable again; applying the queued changes in order");
                    shared.set_consul_status(true, None);
                    // It may have lost its data meanwhile (a dev agent restarted).
                    shared.request_reconcile();
                }
            }
            Err((w, e)) => {
                shared.set_written(&id, w);
                if e.is_transient() && e.status().is_none() {
                    // Consul unreachable: every change would fail alike. The queue waits, in
                    // order, with a backoff.
                    failures += 1;
                    let delay = backoff.delay(failures, &mut rng);
                    shared.retry_first(id);
                    report_failure(&shared, &e, failures, delay, "writing");
                    tokio::time::sleep(delay).await;
                } else if e.is_transient() {
                    // Consul answered, but refused this one change for now (5xx, 429): only
                    // this endpoint waits; the others go on. Its changes stay in order (one
                    // pending change per endpoint).
                    let n = endpoint_failures.entry(id.clone()).or_insert(0);
                    *n += 1;
                    let delay = backoff.delay(*n, &mut rng);
                    if *n == 1 || n.is_power_of_two() {
                        tracing::warn!(id = %id, retry_in = ?delay, attempt = *n, "Consul refused the change of endpoint {id} for now: {e}; retrying it alone, the other endpoints go on");
                    }
                    shared.set_failed(&id, Some(e.to_string()));
                    shared.retry_later(id, delay);
                } else {
                    tracing::error!(id = %id, "Consul refused the change of endpoint {id}: {e}; retrying at the next resync");
                    shared.set_failed(&id, Some(e.to_string()));
                }
            }
        }
    }
}

/// Rewrites the record of pending API calls when some are now held by Consul.
async fn forget_settled_calls(shared: &Arc<Shared>) {
    if shared.calls_changed() {
        let s = Arc::clone(shared);
        match tokio::task::spawn_blocking(move || s.persist_calls()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("{e}; the calls Consul holds now are applied again after a restart (harmless)"),
            Err(e) => tracing::warn!("recording the pending API calls: {e}"),
        }
    }
}

fn report_failure(shared: &Shared, e: &Error, failures: u32, delay: Duration, what: &str) {
    let pending = shared.queue_len();
    if failures == 1 || failures.is_power_of_two() {
        tracing::warn!(pending, retry_in = ?delay, attempt = failures, "{what} failed: {e}; changes are queued and retried in order");
    } else {
        tracing::debug!(pending, retry_in = ?delay, attempt = failures, "{what} failed: {e}");
    }
    shared.set_consul_status(false, Some(e.to_string()));
}

fn log_change(id: &str, t: &Target, w: &Written) {
    let kv = w.kv.as_ref().map(|k| k.key.as_str()).unwrap_or("-");
    if t.service.is_none() && t.kv.is_none() && t.record.is_none() {
        tracing::info!(id, "deregistered");
    } else if let Some(reason) = t.service.as_ref().and_then(|s| s.maintenance.as_deref()) {
        tracing::info!(id, kv, "marked down ({reason})");
    } else if t.kv.as_ref().is_some_and(|(_, v)| v.contains("\"down\":1")) {
        tracing::info!(id, kv, "marked down");
    } else {
        tracing::info!(id, kv, "registered");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txn_ops_are_consul_json() {
        let ops = [
            KvOp::Set { key: "up/web/10.0.0.1:80".into(), value: "{}".into() },
            KvOp::Delete { key: "a".into() },
            KvOp::DeleteCas { key: "b".into(), index: 42 },
        ];
        let v: Vec<_> = ops.iter().map(KvOp::to_json).collect();
        assert_eq!(v[0]["KV"]["Verb"], "set");
        assert_eq!(v[0]["KV"]["Value"], "e30=");
        assert_eq!(v[1]["KV"]["Verb"], "delete");
        assert_eq!(v[2]["KV"]["Verb"], "delete-cas");
        assert_eq!(v[2]["KV"]["Index"], 42);
    }
}
