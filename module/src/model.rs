//! The state one upstream shares between nginx workers: the server list in the form nginx
//! needs (resolved socket addresses) plus what the last sync said. The leader worker writes both
//! into the upstream's shared-memory slot (the list in a compact binary form, the metadata
//! inline); every worker reads the list back when the slot's version moves.
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

/// Appends nginx's peer name for `addr` to `out`: the same bytes as its `Display`
/// (`1.2.3.4:80`, `[::1]:80`), IPv4 written digit by digit. Building a peer list names every
/// server; through `core::fmt` an IPv4 name cost ~1,300 instructions, 45% of what installing a
/// list of 1,000 servers costs a worker (bench-callgrind); this costs ~100.
pub fn write_addr(out: &mut Vec<u8>, addr: &SocketAddr) {
    match addr {
        SocketAddr::V4(a) => {
            for (i, octet) in a.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                push_decimal(out, octet.into());
            }
            out.push(b':');
            push_decimal(out, a.port().into());
        }
        SocketAddr::V6(_) => {
            use std::io::Write;
            let _ = write!(out, "{addr}");
        }
    }
}

fn push_decimal(out: &mut Vec<u8>, mut n: u32) {
    let mut digits = [0u8; 10];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
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

/// How the upstream's watch is doing (shown in `upstream_show` JSON).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WatchHealth {
    /// No leader has run the watch yet, or it has not had its first answer.
    #[default]
    Starting,
    /// The last poll succeeded.
    Healthy,
    /// The last attempt failed (Consul unreachable or refusing, the client could not be built,
    /// the task panicked...): it is retried with backoff while the last list keeps serving.
    Failing,
}

/// What kind of problem a sync error was, for the error counters (`upstream_show` JSON,
/// `upsync_nginx_consul_errors_total{kind}`). The names are the metric's label values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// TCP connect or name resolution of the Consul address failed.
    Connect,
    /// TLS handshake with Consul failed.
    Tls,
    /// No answer in time, or an answer that stalled or trickled.
    Timeout,
    /// The connection broke mid-exchange, or the answer was not HTTP.
    Transport,
    /// HTTP 403: the ACL token was refused.
    Acl,
    /// Any other HTTP error status.
    Http,
    /// An answer that cannot be used (malformed JSON, garbage `X-Consul-Index`).
    Decode,
    /// An answer larger than `max_body`.
    TooLarge,
    /// An answer with no servers, refused (`upsync_allow_empty off`).
    Empty,
    /// The shared zone had no room for the list (`upsync_shm_size`).
    ZoneFull,
    /// The watch could not start (client configuration: CA file, token file...).
    Config,
    /// The watch task panicked or ended and was restarted.
    Restart,
    Other,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 13] = [
        ErrorKind::Connect,
        ErrorKind::Tls,
        ErrorKind::Timeout,
        ErrorKind::Transport,
        ErrorKind::Acl,
        ErrorKind::Http,
        ErrorKind::Decode,
        ErrorKind::TooLarge,
        ErrorKind::Empty,
        ErrorKind::ZoneFull,
        ErrorKind::Config,
        ErrorKind::Restart,
        ErrorKind::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Tls => "tls",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Transport => "transport",
            ErrorKind::Acl => "acl",
            ErrorKind::Http => "http",
            ErrorKind::Decode => "decode",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::Empty => "empty",
            ErrorKind::ZoneFull => "zone_full",
            ErrorKind::Config => "config",
            ErrorKind::Restart => "restart",
            ErrorKind::Other => "other",
        }
    }

    /// The kind of a recorded error, from its message. The messages come from
    /// `upsync_discovery::Error`'s `Display` (each variant starts its own way) and from the
    /// module's own (poller, shared zone); the unit tests render every variant, so a changed
    /// message fails them rather than miscounting. (The error reaches the slot as a message:
    /// carrying the kind from the poller would need its `Update` to change.)
    pub fn of(message: &str) -> ErrorKind {
        let m = message;
        if m.starts_with("cannot connect to Consul") {
            ErrorKind::Connect
        } else if m.starts_with("TLS handshake with Consul") {
            ErrorKind::Tls
        } else if m.starts_with("HTTP exchange with Consul") {
            ErrorKind::Transport
        } else if m.starts_with("ACL token rejected") {
            ErrorKind::Acl
        } else if m.starts_with("the response of Consul") && m.contains(" exceeds ") {
            ErrorKind::TooLarge
        } else if m.starts_with("Consul returned no servers") {
            ErrorKind::Empty
        } else if m.starts_with("invalid Consul client configuration") || m.starts_with("cannot start the Consul watch") {
            ErrorKind::Config
        } else if m.starts_with("the Consul watch ") {
            ErrorKind::Restart
        } else if m.starts_with("the shared zone") && m.contains("has no room") {
            ErrorKind::ZoneFull
        } else if m.starts_with("etcd returned no servers") {
            ErrorKind::Empty
        } else if let Some((_, said)) = m.strip_prefix("etcd at ").and_then(|r| r.split_once(": ")) {
            // upsync_discovery::etcd's messages, "etcd at ADDRESS: WHAT" (the forms are listed
            // there, and tested in discovery/src/etcd/tests.rs).
            if said.starts_with("cannot connect") {
                ErrorKind::Connect
            } else if said.starts_with("TLS handshake") {
                ErrorKind::Tls
            } else if said.starts_with("no answer to") || said.contains(" was not complete ") {
                ErrorKind::Timeout
            } else if said.starts_with("HTTP exchange failed") || said.starts_with("the member ended") {
                ErrorKind::Transport
            } else if said.contains(" exceeds ") {
                ErrorKind::TooLarge
            } else if said.contains(" cannot be used") {
                ErrorKind::Decode
            } else if said.contains(": HTTP ") {
                ErrorKind::Http
            } else {
                ErrorKind::Other
            }
        } else if m.starts_with("Consul at ") {
            if m.contains(" did not answer ") || m.contains(" began answering ") {
                ErrorKind::Timeout
            } else if m.contains(" sent a response to ") {
                ErrorKind::Decode
            } else if m.contains(" with HTTP ") {
                ErrorKind::Http
            } else {
                ErrorKind::Other
            }
        } else {
            ErrorKind::Other
        }
    }
}

/// Sync errors by [`ErrorKind`] (indexed like [`ErrorKind::ALL`]), since the slot was created.
pub type ErrorCounts = [u64; ErrorKind::ALL.len()];

/// What one upstream's shared slot says besides the list itself: where the list came from and
/// what the last sync said. Small and bounded ([`SlotMeta::encode_bounded`]), so it is stored
/// inline in the slot and recording an error never needs an allocation (the zone may be full).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotMeta {
    pub origin: Origin,
    /// `X-Consul-Index` of the answer the list came from (0 when not from Consul).
    pub consul_index: u64,
    /// Unix time (ms) the list last changed.
    pub changed_ms: u64,
    /// Unix time (ms) of the last successful answer from Consul (0: none yet).
    pub synced_ms: u64,
    /// The last problem (Consul unreachable, malformed answer, empty answer refused, zone
    /// full...), with the time it happened; cleared by the next list installed or answer.
    pub last_error: Option<String>,
    pub error_ms: u64,
    /// PID of the worker that holds the Consul watch.
    pub leader_pid: i64,
    pub watch: WatchHealth,
    /// How often the watch task was restarted after a panic (by this leader).
    pub watch_restarts: u32,
    /// Errors recorded, by kind ([`SlotMeta::count_error`]).
    pub errors: ErrorCounts,
    /// `error_ms` of the last error counted, so an error written twice counts once.
    pub counted_error_ms: u64,
}

impl SlotMeta {
    /// The encoded metadata, at most `cap` bytes: a long error message is cut (at a character
    /// boundary, with "...") until it fits.
    pub fn encode_bounded(&self, cap: usize) -> Vec<u8> {
        let mut m = self.clone();
        loop {
            let bytes = postcard::to_allocvec(&m).unwrap_or_default();
            if bytes.len() <= cap {
                return bytes;
            }
            match &mut m.last_error {
                Some(e) if !e.is_empty() => {
                    let mut keep = e.len().saturating_sub(bytes.len() - cap + 3).min(e.len() - 1);
                    while !e.is_char_boundary(keep) {
                        keep -= 1;
                    }
                    e.truncate(keep);
                    e.push_str("...");
                    if keep == 0 {
                        m.last_error = Some(String::new());
                    }
                }
                _ => return Vec::new(),
            }
        }
    }

    /// Counts the error this metadata records (`last_error` at `error_ms`) in [`Self::errors`],
    /// unless it was counted already. Called whenever the metadata is written to the slot, so
    /// every error recorded there is counted once, whichever path recorded it.
    pub fn count_error(&mut self) {
        if let Some(e) = &self.last_error {
            if self.error_ms != self.counted_error_ms {
                let i = ErrorKind::ALL.iter().position(|&k| k == ErrorKind::of(e)).unwrap_or(ErrorKind::ALL.len() - 1);
                self.errors[i] = self.errors[i].saturating_add(1);
                self.counted_error_ms = self.error_ms;
            }
        }
    }

    /// The error counters as (kind, count), every kind listed.
    pub fn error_counts(&self) -> impl Iterator<Item = (ErrorKind, u64)> + '_ {
        ErrorKind::ALL.iter().copied().zip(self.errors.iter().copied())
    }

    pub fn decode(bytes: &[u8]) -> Result<SlotMeta, String> {
        postcard::from_bytes(bytes).map_err(|e| format!("corrupt upsync shared slot metadata: {e}"))
    }
}

/// A server list in the compact binary form kept in the shared zone (postcard: ~20 bytes per
/// server, decoded in one pass without parsing text; JSON took ~20x longer for 50,000 servers).
pub fn encode_servers(servers: &[Server]) -> Vec<u8> {
    postcard::to_allocvec(servers).unwrap_or_default()
}

pub fn decode_servers(bytes: &[u8]) -> Result<Vec<Server>, String> {
    postcard::from_bytes(bytes).map_err(|e| format!("corrupt upsync shared slot: {e}"))
}

/// A map keyed by server address with FNV hashing: the address comes from the operator's own
/// registry, and std's SipHash was ~7% of the poller's work per list change (callgrind).
pub type AddrMap<V> = std::collections::HashMap<SocketAddr, V, fnv::FnvBuildHasher>;
/// A set of server addresses, hashed like [`AddrMap`].
pub type AddrSet = std::collections::HashSet<SocketAddr, fnv::FnvBuildHasher>;

/// What changed between two lists, as `+added -removed ~changed`, in one pass over each
/// (a list of 50,000 servers must not cost a pairwise comparison).
pub fn describe_change(old: &[Server], new: &[Server]) -> String {
    let before: AddrMap<&Server> = old.iter().map(|s| (s.addr, s)).collect();
    let (mut added, mut changed, mut kept) = (0usize, 0usize, 0usize);
    for n in new {
        match before.get(&n.addr) {
            None => added += 1,
            Some(o) => {
                kept += 1;
                if *o != n {
                    changed += 1;
                }
            }
        }
    }
    format!("+{added} -{} ~{changed}", before.len().saturating_sub(kept))
}

/// nginx-upsync-module's listing order (`upstream_show`, the dump file): a server that stays
/// keeps its place (with its new attributes); each server that joins goes to the head of the
/// list, in the order Consul lists them (keys in byte order: `IP:PORT` text), so several joining
/// at once end up in reverse order. The same Consul history gives the same listing as the C
/// module. (Balancing does not depend on it: the peers are kept sorted by address.) Linear.
pub fn listing_order(prev: Option<&[Server]>, new: Vec<Server>) -> Vec<Server> {
    let Some(prev) = prev else {
        return listing_order(Some(&[]), new);
    };
    let mut by_addr: AddrMap<Server> = new.into_iter().map(|s| (s.addr, s)).collect();
    let staying: Vec<Server> = prev.iter().filter_map(|p| by_addr.remove(&p.addr)).collect();
    let mut joining: Vec<(Vec<u8>, Server)> = by_addr
        .into_values()
        .map(|s| {
            let mut key = Vec::with_capacity(21);
            write_addr(&mut key, &s.addr);
            (key, s)
        })
        .collect();
    joining.sort_by(|a, b| a.0.cmp(&b.0));
    joining.into_iter().rev().map(|(_, s)| s).chain(staying).collect()
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A stable 64-bit FNV-1a hash of `parts` (each followed by a 0xff separator). The key of an
/// upstream's slot must be the same in the master and in every worker, and across reloads;
/// std's `DefaultHasher` promises neither.
pub fn stable_hash(parts: &[&str]) -> u64 {
    use std::hash::Hasher;
    let mut h = fnv::FnvHasher::default();
    for p in parts {
        h.write(p.as_bytes());
        h.write_u8(0xff);
    }
    h.finish()
}

/// The key of an upstream's slot: its name and what identifies the list it syncs (type,
/// Consul addresses, path, datacenter, consistency, health mode). Parameters that do not change
/// the list (`upsync_timeout`, `upsync_interval`, tokens, TLS files) keep the slot, so a reload
/// that only changes them starts from the same list; the rest starts a new slot. Built from
/// explicit fields (not `Debug` output, which is free to change between builds).
pub fn slot_key(upstream: &str, u: &crate::conf::Upsync) -> u64 {
    use crate::conf::{Consistency, Source};
    let addresses: Vec<String> = u.addresses.iter().map(|a| a.to_string()).collect();
    let (kind, what, health) = match &u.source {
        Source::Kv { prefix } => ("consul", prefix.as_str(), ""),
        Source::CatalogService { name } => ("consul_services", name.as_str(), ""),
        Source::HealthService { name, omit_unhealthy } => ("consul_health", name.as_str(), if *omit_unhealthy { "omit" } else { "down" }),
        Source::Etcd { api: crate::conf::EtcdApi::V2, prefix } => ("etcd_v2", prefix.as_str(), ""),
        Source::Etcd { api: crate::conf::EtcdApi::V3, prefix } => ("etcd_v3", prefix.as_str(), ""),
    };
    let consistency = match u.consistency {
        Consistency::Default => "default",
        Consistency::Stale => "stale",
        Consistency::Consistent => "consistent",
    };
    stable_hash(&["upsync-slot-v2", upstream, kind, &addresses.join(","), what, health, u.datacenter.as_deref().unwrap_or(""), consistency])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_addr_writes_what_display_writes() {
        let mut addrs: Vec<SocketAddr> =
            ["0.0.0.0:0", "255.255.255.255:65535", "10.0.1.99:8080", "127.0.0.1:9", "[::1]:80", "[fe80::1%2]:443"]
                .iter()
                .map(|a| a.parse().unwrap())
                .collect();
        for n in [0u32, 1, 9, 10, 99, 100, 199, 200, 255] {
            addrs.push(SocketAddr::from(([n as u8, (n * 7 % 256) as u8, (255 - n) as u8, (n / 3) as u8], (n * 257 % 65536) as u16)));
        }
        for port in [0u16, 7, 10, 65, 999, 1000, 9999, 10000, 65535] {
            addrs.push(SocketAddr::from(([192, 168, 0, 1], port)));
        }
        let mut out = Vec::new();
        for a in &addrs {
            out.clear();
            write_addr(&mut out, a);
            assert_eq!(String::from_utf8(out.clone()).unwrap(), a.to_string());
        }
    }

    fn srv(a: &str, w: u32) -> Server {
        Server { addr: a.parse().unwrap(), weight: w, max_fails: 2, fail_timeout: 10, down: false, backup: false }
    }

    #[test]
    fn joining_servers_go_to_the_head_staying_ones_keep_their_place() {
        let names = |v: &[Server]| v.iter().map(|s| s.addr.to_string()).collect::<Vec<_>>();
        let l1 = listing_order(None, vec![srv("10.0.0.1:80", 1)]);
        assert_eq!(names(&l1), ["10.0.0.1:80"]);
        // Two join at once: Consul lists .2 then .3; each goes to the head in turn.
        let l2 = listing_order(Some(&l1), vec![srv("10.0.0.1:80", 1), srv("10.0.0.2:80", 1), srv("10.0.0.3:80", 1)]);
        assert_eq!(names(&l2), ["10.0.0.3:80", "10.0.0.2:80", "10.0.0.1:80"]);
        // An update keeps the place and takes the new attributes; a removal closes the gap.
        let l3 = listing_order(Some(&l2), vec![srv("10.0.0.1:80", 1), srv("10.0.0.2:80", 5)]);
        assert_eq!(names(&l3), ["10.0.0.2:80", "10.0.0.1:80"]);
        assert_eq!(l3[0].weight, 5);
        // Byte order of the keys: "10.0.0.11:80" sorts before "10.0.0.4:80".
        let l4 =
            listing_order(Some(&l3), vec![srv("10.0.0.4:80", 1), srv("10.0.0.11:80", 1), srv("10.0.0.1:80", 1), srv("10.0.0.2:80", 5)]);
        assert_eq!(names(&l4), ["10.0.0.4:80", "10.0.0.11:80", "10.0.0.2:80", "10.0.0.1:80"]);
    }

    #[test]
    fn slot_contents_round_trip() {
        let servers = vec![
            Server { addr: "[::1]:80".parse().unwrap(), weight: 2, max_fails: 1, fail_timeout: 3, down: true, backup: true },
            srv("10.0.0.1:8080", 1),
        ];
        assert_eq!(decode_servers(&encode_servers(&servers)).unwrap(), servers);
        assert!(decode_servers(&[0xff]).unwrap_err().contains("corrupt"));
        assert_eq!(servers[0].name(), "[::1]:80");
        let m = SlotMeta {
            origin: Origin::Consul,
            consul_index: 42,
            changed_ms: 1,
            synced_ms: 2,
            last_error: Some("x".into()),
            error_ms: 3,
            leader_pid: 7,
            watch: WatchHealth::Failing,
            watch_restarts: 1,
            errors: [u64::MAX; ErrorKind::ALL.len()],
            counted_error_ms: 3,
        };
        assert_eq!(SlotMeta::decode(&m.encode_bounded(1024)).unwrap(), m);
    }

    #[test]
    fn every_error_message_has_its_kind() {
        use std::time::Duration;
        use upsync_discovery::{ConsulAddr, DecodeError, Error};
        let address = ConsulAddr::parse("127.0.0.1:8500").unwrap();
        let (method, path) = ("GET".to_string(), "/v1/kv/upstreams/app?recurse&index=5".to_string());
        let after = Duration::from_secs(10);
        let cases = [
            (Error::Config("bad CA".into()), ErrorKind::Config),
            (Error::Connect { address: address.clone(), message: "refused".into() }, ErrorKind::Connect),
            (Error::Tls { address: address.clone(), message: "unknown CA".into() }, ErrorKind::Tls),
            (Error::Timeout { address: address.clone(), method: method.clone(), path: path.clone(), after }, ErrorKind::Timeout),
            (Error::Stalled { address: address.clone(), method: method.clone(), path: path.clone(), after }, ErrorKind::Timeout),
            (
                Error::Transport { address: address.clone(), method: method.clone(), path: path.clone(), message: "reset".into() },
                ErrorKind::Transport,
            ),
            (
                Error::AclDenied {
                    address: address.clone(),
                    method: method.clone(),
                    path: path.clone(),
                    status: 403,
                    message: "Permission denied".into(),
                },
                ErrorKind::Acl,
            ),
            (
                Error::Http { address: address.clone(), method: method.clone(), path: path.clone(), status: 500, message: "x".into() },
                ErrorKind::Http,
            ),
            (
                Error::Decode {
                    address: address.clone(),
                    path: path.clone(),
                    error: DecodeError { what: "X-Consul-Index header", message: "\"abc\" is not a Consul index".into() },
                },
                ErrorKind::Decode,
            ),
            (Error::TooLarge { address: address.clone(), path: path.clone(), limit: 4096 }, ErrorKind::TooLarge),
        ];
        for (e, kind) in cases {
            assert_eq!(ErrorKind::of(&e.to_string()), kind, "{e}");
        }
        // The module's own messages (poller.rs, ffi/shm.rs).
        for (m, kind) in [
            (
                "Consul returned no servers at index 7; keeping the last 2 (upsync_allow_empty on lets an upstream become empty)",
                ErrorKind::Empty,
            ),
            ("cannot start the Consul watch: cannot read CA file (attempt 2, next try in 1000 ms)", ErrorKind::Config),
            ("the Consul watch panicked: boom; restarting it in 1000 ms", ErrorKind::Restart),
            ("the Consul watch ended; restarting it in 1000 ms", ErrorKind::Restart),
            (
                "the shared zone \"upsync\" has no room for a list of 9 bytes; the workers keep the previous list; raise upsync_shm_size",
                ErrorKind::ZoneFull,
            ),
            ("something new", ErrorKind::Other),
            // upsync_discovery::etcd's (discovery/src/etcd/tests.rs checks it writes these forms).
            (
                "etcd returned no servers at index 7; keeping the last 2 (upsync_allow_empty on lets an upstream become empty)",
                ErrorKind::Empty,
            ),
            (
                "etcd at http://127.0.0.1:2379: cannot connect: 127.0.0.1:2379: Connection refused (os error 111); check that etcd runs",
                ErrorKind::Connect,
            ),
            ("etcd at https://[::1]:2379: TLS handshake failed: received fatal alert: BadCertificate; check the CA file", ErrorKind::Tls),
            ("etcd at http://127.0.0.1:2379: no answer to GET /v2/keys/a?recursive=true&quorum=true within 10s", ErrorKind::Timeout),
            ("etcd at http://127.0.0.1:2379: the answer to GET /x was not complete 10s after it began (stalled)", ErrorKind::Timeout),
            ("etcd at http://127.0.0.1:2379: HTTP exchange failed (POST /v3/watch): reading the answer: EOF", ErrorKind::Transport),
            ("etcd at http://127.0.0.1:2379: the member ended the watch stream", ErrorKind::Transport),
            ("etcd at http://127.0.0.1:2379: the answer to /v3/watch exceeds 4096 bytes; raise max_body", ErrorKind::TooLarge),
            (
                "etcd at http://127.0.0.1:2379: the answer to POST /v3/kv/range cannot be used: etcd v3 range: invalid JSON",
                ErrorKind::Decode,
            ),
            ("etcd at http://127.0.0.1:2379: GET /v2/keys/a: HTTP 404: 404 page not found; the v2 API is not enabled", ErrorKind::Http),
            ("etcd at http://127.0.0.1:2379: the watch was canceled: etcdserver: no leader", ErrorKind::Other),
        ] {
            assert_eq!(ErrorKind::of(m), kind, "{m}");
        }
        let names: std::collections::HashSet<_> = ErrorKind::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(names.len(), ErrorKind::ALL.len());
    }

    #[test]
    fn an_error_is_counted_once_by_kind() {
        let mut m = SlotMeta::default();
        m.count_error();
        assert_eq!(m.errors, [0; ErrorKind::ALL.len()]);
        m.last_error = Some("Consul returned no servers at index 3".into());
        m.error_ms = 100;
        m.count_error();
        m.count_error(); // written again (e.g. with another field changed): not a new error
        m.error_ms = 200;
        m.count_error();
        m.last_error = Some("the Consul watch panicked: x".into());
        m.error_ms = 300;
        m.count_error();
        let counts: std::collections::HashMap<_, _> = m.error_counts().map(|(k, n)| (k.name(), n)).collect();
        assert_eq!((counts["empty"], counts["restart"], counts["connect"]), (2, 1, 0));
        m.last_error = None;
        m.error_ms = 400;
        m.count_error();
        assert_eq!(m.errors.iter().sum::<u64>(), 3);
    }

    #[test]
    fn metadata_is_bounded_and_keeps_what_matters() {
        let long = "é".repeat(5000);
        let m = SlotMeta { consul_index: 9, last_error: Some(long), leader_pid: 3, ..Default::default() };
        let bytes = m.encode_bounded(512);
        assert!(bytes.len() <= 512, "{}", bytes.len());
        let back = SlotMeta::decode(&bytes).unwrap();
        assert_eq!((back.consul_index, back.leader_pid), (9, 3));
        assert!(back.last_error.unwrap().ends_with("..."));
    }

    #[test]
    fn change_summary_is_linear_and_right() {
        let old = vec![srv("10.0.0.1:80", 1), srv("10.0.0.2:80", 1), srv("10.0.0.3:80", 1)];
        let new = vec![srv("10.0.0.2:80", 5), srv("10.0.0.3:80", 1), srv("10.0.0.4:80", 1), srv("10.0.0.5:80", 1)];
        assert_eq!(describe_change(&old, &new), "+2 -1 ~1");
        // 50,000 servers: a pairwise comparison would take seconds; this is a few ms.
        let big: Vec<Server> = (0..50_000u32).map(|i| srv(&format!("10.{}.{}.{}:80", i >> 16, (i >> 8) & 255, i & 255), 1)).collect();
        assert_eq!(describe_change(&big, &big[1..]), "+0 -1 ~0");
    }

    #[test]
    fn slot_key_ignores_what_does_not_change_the_list() {
        use crate::conf::parse_upsync;
        let a = parse_upsync(&["127.0.0.1:8500/v1/kv/upstreams/app", "upsync_timeout=6m"]).unwrap();
        let b = parse_upsync(&["127.0.0.1:8500/v1/kv/upstreams/app", "upsync_timeout=30s", "upsync_interval=1s"]).unwrap();
        let c = parse_upsync(&["127.0.0.1:8500/v1/kv/upstreams/other"]).unwrap();
        let d = parse_upsync(&["127.0.0.1:8500/v1/kv/upstreams/app", "dc=dc2"]).unwrap();
        assert_eq!(slot_key("app", &a), slot_key("app", &b));
        assert_ne!(slot_key("app", &a), slot_key("app", &c));
        assert_ne!(slot_key("app", &a), slot_key("app", &d));
        assert_ne!(slot_key("app", &a), slot_key("app2", &a));
    }

    #[test]
    fn hash_is_stable() {
        assert_eq!(stable_hash(&["a", "b"]), stable_hash(&["a", "b"]));
        assert_ne!(stable_hash(&["ab", ""]), stable_hash(&["a", "b"]));
        // Pinned: the value must not change between builds (slots survive reloads).
        assert_eq!(stable_hash(&[]), 0xcbf2_9ce4_8422_2325);
    }
}
