//! One live sidecar per node id: a Consul session holding the KV lock
//! `STATE_PREFIX/NODE/lock`.
//!
//! Node ids default to the host name, and nothing else stops two hosts from sharing one; two
//! sidecars with the same id would each delete what the other registered (what "this node
//! owns" but does not run). So the applier writes nothing and reconciles nothing until this
//! sidecar holds the lock; a second sidecar with the same id reports the holder (`/healthz`
//! `lock`, and an error in the log) and waits.
//!
//! The session has a TTL of [`TTL`] (renewed every [`RENEW`]) and a lock delay of
//! [`LOCK_DELAY`]: a sidecar that stops renewing (crash, partition) loses the lock within
//! about two TTLs (Consul's grace), and nobody else takes it for the lock delay after that,
//! longer than the renew interval after which a holder that lost its session stops writing.
//! The session id is kept in the state directory: a sidecar restarted after a crash renews
//! its own session and holds the lock again at once. A token whose policy allows no session
//! (an older policy) leaves the sidecar working without the lock, reported as `unavailable`. A graceful stop releases the lock and
//! destroys the session.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use upsync_discovery::{Client, Error, Method};

use crate::state::{LockState, Shared};

/// Session TTL.
pub const TTL: Duration = Duration::from_secs(15);
/// How often the session is renewed and the lock checked.
pub const RENEW: Duration = Duration::from_secs(5);
/// Consul's lock delay of the session.
pub const LOCK_DELAY: Duration = Duration::from_secs(5);
/// How often a sidecar without the lock (or without Consul) tries again.
const RETRY: Duration = Duration::from_secs(1);

#[derive(Deserialize)]
struct Created {
    #[serde(rename = "ID")]
    id: String,
}

#[derive(Deserialize)]
struct SessionInfo {
    #[serde(rename = "Node", default)]
    node: String,
    #[serde(rename = "Name", default)]
    name: String,
}

/// The lock's KV key.
pub fn lock_key(shared: &Shared) -> String {
    format!("{}/{}/lock", shared.settings.state_prefix, shared.settings.node_id)
}

fn session_file(shared: &Shared) -> PathBuf {
    shared.settings.state_dir.join(format!("{}.session", shared.settings.node_id))
}

async fn create_session(client: &Client, shared: &Shared) -> Result<String, Error> {
    let host = gethostname::gethostname().to_string_lossy().to_string();
    let body = serde_json::json!({
        "Name": format!("upsync-sidecar {} (host {host}, pid {})", shared.settings.node_id, std::process::id()),
        "TTL": format!("{}s", TTL.as_secs()),
        "LockDelay": format!("{}s", LOCK_DELAY.as_secs()),
        "Behavior": "release",
    })
    .to_string();
    let r = client.request(Method::PUT, "/v1/session/create", Some(body.into()), None).await?;
    let c: Created = serde_json::from_slice(&r.body).map_err(|e| Error::Config(format!("session create: unexpected answer ({e})")))?;
    if let Err(e) = std::fs::write(session_file(shared), &c.id) {
        tracing::warn!("cannot keep the Consul session id in {}: {e}; a restart waits for the lock delay", session_file(shared).display());
    }
    Ok(c.id)
}

/// Renews `id`; `false` when Consul does not know it (expired, destroyed, agent data lost).
async fn renew(client: &Client, id: &str) -> Result<bool, Error> {
    let r = client.request(Method::PUT, &format!("/v1/session/renew/{id}"), None, None).await?;
    Ok(r.status != 404)
}

async fn acquire(client: &Client, key: &str, id: &str, shared: &Shared) -> Result<bool, Error> {
    let body = serde_json::json!({"node": shared.settings.node_id, "pid": std::process::id(), "api": shared.settings.listen.to_string()})
        .to_string();
    let path = format!("/v1/kv/{key}?acquire={id}");
    let r = client.request(Method::PUT, &path, Some(body.into()), None).await?;
    Ok(r.body.trim_ascii() == b"true")
}

/// Who holds the lock, for the error message.
async fn holder(client: &Client, key: &str) -> String {
    let Ok(Some(pair)) = client.kv_get(key).await else { return "nobody now (retrying)".into() };
    let Some(session) = pair.session else {
        return "nobody, but the lock delay of the previous holder's session is running".into();
    };
    let info = match client.get(&format!("/v1/session/info/{session}"), None).await {
        Ok(r) => serde_json::from_slice::<Vec<SessionInfo>>(&r.body).ok().and_then(|v| v.into_iter().next()),
        Err(_) => None,
    };
    match info {
        Some(i) => format!("session {session} `{}` of Consul node {}", i.name, i.node),
        None => format!("session {session}"),
    }
}

/// The lock task: runs forever.
pub async fn run(shared: Arc<Shared>, client: Client) {
    let key = lock_key(&shared);
    // A session this sidecar's state directory remembers: ours, from before a restart.
    let mut session: Option<String> =
        std::fs::read_to_string(session_file(&shared)).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    let mut reported = String::new();
    loop {
        let step = async {
            let id = match &session {
                Some(id) if renew(&client, id).await? => id.clone(),
                _ => create_session(&client, &shared).await?,
            };
            session = Some(id.clone());
            let held = acquire(&client, &key, &id, &shared).await?;
            Ok::<_, Error>(held)
        };
        let wait = match step.await {
            Ok(true) => {
                if shared.set_lock(LockState::Held) {
                    tracing::info!(key = %key, "holding the lock of node {}: reconciling", shared.settings.node_id);
                }
                reported.clear();
                RENEW
            }
            Ok(false) => {
                let who = holder(&client, &key).await;
                let msg = format!(
                    "another upsync-sidecar holds the lock {key} of node id `{}` ({who}); two hosts with the same node id would delete \
                     each other's entries, so this one registers and reconciles nothing: give each host its own --node-id \
                     (or stop the other one)",
                    shared.settings.node_id
                );
                if msg != reported {
                    tracing::error!("{msg}");
                    reported = msg.clone();
                }
                shared.set_lock(LockState::Conflict(msg));
                RETRY
            }
            Err(e) if e.is_acl_denied() => {
                // An older policy without sessions: work as before, unprotected, and say so.
                let msg = format!(
                    "cannot take the node lock {key} ({e}); a second sidecar with the same node id is NOT detected: \
                     allow `session_prefix \"\" {{ policy = \"write\" }}` and write on {key} in the token's policy"
                );
                if shared.set_lock(LockState::Unavailable(msg.clone())) {
                    tracing::error!("{msg}");
                }
                RENEW
            }
            Err(e) => {
                // Consul unreachable: nothing can be written anyway; a lock held stays held
                // (for the session's TTL at most: the next renewal tells).
                tracing::debug!("lock {key}: {e}");
                if !shared.lock_held() {
                    shared.set_consul_status(false, Some(e.to_string()));
                }
                RETRY
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// On a graceful stop: the lock is released (free at once for the next sidecar: an explicit
/// release has no lock delay) and the session destroyed and forgotten.
pub async fn release(shared: &Shared, client: &Client) {
    let file = session_file(shared);
    if let Ok(id) = std::fs::read_to_string(&file) {
        let id = id.trim().to_string();
        let key = lock_key(shared);
        let done = async {
            let _ = client.request(Method::PUT, &format!("/v1/kv/{key}?release={id}"), None, None).await;
            let _ = client.request(Method::PUT, &format!("/v1/session/destroy/{id}"), None, None).await;
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), done).await;
        let _ = std::fs::remove_file(&file);
    }
}
