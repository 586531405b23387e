//! The state one upstream shares between nginx workers: the server list in the form nginx
//! needs (resolved socket addresses) plus what the last sync said. The leader worker writes it
//! into the shared-memory slot as JSON; every worker reads it back when the slot's version moves.
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// One server of an upstream, ready for nginx's round-robin peer list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Server {
    pub addr: SocketAddr,
    pub weight: u32,
    pub max_fails: u32,
    /// Seconds.
    pub fail_timeout: u32,
    pub down: bool,
    pub backup: bool,
}

impl Server {
    /// nginx's peer name for this server (`ngx_sock_ntop` with port: `1.2.3.4:80`, `[::1]:80`).
    pub fn name(&self) -> String {
        self.addr.to_string()
    }
}

/// Where the current list came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// The `server` lines of the upstream block (nothing synced yet).
    #[default]
    Config,
    /// `upsync_dump_path`, read at start-up.
    Dump,
    /// A Consul answer.
    Consul,
}

/// The content of one upstream's shared slot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotState {
    /// The list, sorted as the registry data was (stable across nginx instances); primary and
    /// backup servers mixed, told apart by `backup`.
    pub servers: Vec<Server>,
    pub origin: Origin,
    /// `X-Consul-Index` of the answer the list came from (0 when not from Consul).
    pub consul_index: u64,
    /// Unix time (ms) the list last changed.
    pub changed_ms: u64,
    /// Unix time (ms) of the last successful answer from Consul (0: none yet).
    pub synced_ms: u64,
    /// The last problem (Consul unreachable, malformed answer, empty answer refused...), with
    /// the time it happened; cleared by the next successful answer.
    pub last_error: Option<String>,
    pub error_ms: u64,
    /// PID of the worker that holds the Consul watch.
    pub leader_pid: i64,
}

impl SlotState {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8]) -> Result<SlotState, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("corrupt upsync shared slot: {e}"))
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A stable 64-bit FNV-1a hash (the key of an upstream's slot must be the same in the master and
/// in every worker, and across reloads; std's `DefaultHasher` promises neither).
pub fn stable_hash(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0xff)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_state_round_trips() {
        let s = SlotState {
            servers: vec![Server { addr: "[::1]:80".parse().unwrap(), weight: 2, max_fails: 1, fail_timeout: 3, down: true, backup: true }],
            origin: Origin::Consul,
            consul_index: 42,
            changed_ms: 1,
            synced_ms: 2,
            last_error: Some("x".into()),
            error_ms: 3,
            leader_pid: 7,
        };
        assert_eq!(SlotState::from_json(&s.to_json()).unwrap(), s);
        assert!(SlotState::from_json(b"{").unwrap_err().contains("corrupt"));
        assert_eq!(s.servers[0].name(), "[::1]:80");
    }

    #[test]
    fn hash_is_stable() {
        assert_eq!(stable_hash(&["a", "b"]), stable_hash(&["a", "b"]));
        assert_ne!(stable_hash(&["ab", ""]), stable_hash(&["a", "b"]));
        // Pinned: the value must not change between builds (slots survive reloads).
        assert_eq!(stable_hash(&[]), 0xcbf2_9ce4_8422_2325);
    }
}
