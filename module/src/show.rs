//! `upstream_show`: nginx-upsync-module's text format, byte for byte, and a JSON view with the
//! per-server state and the sync status. The FFI layer fills the view from nginx's peers and the
//! shared slots; rendering is here.
use serde::Serialize;

use crate::model::{Origin, Server, WatchHealth};

#[derive(Clone, Debug, Serialize)]
pub struct UpstreamView {
    pub name: String,
    pub servers: Vec<ServerView>,
    /// Present for upstreams synced by this module.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncView>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ServerView {
    #[serde(flatten)]
    pub server: ServerJson,
    /// Failures counted by the answering worker (passive health: max_fails/fail_timeout).
    pub fails: u64,
    /// Requests the answering worker has in flight to this server.
    pub active: u64,
}

/// A server as JSON: the name as nginx prints it, the rest as configured.
#[derive(Clone, Debug, Serialize)]
pub struct ServerJson {
    pub server: String,
    pub weight: u32,
    pub max_fails: u32,
    pub fail_timeout: u32,
    pub down: bool,
    pub backup: bool,
}

impl From<&Server> for ServerJson {
    fn from(s: &Server) -> Self {
        ServerJson {
            server: s.name(),
            weight: s.weight,
            max_fails: s.max_fails,
            fail_timeout: s.fail_timeout,
            down: s.down,
            backup: s.backup,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct SyncView {
    /// The Consul query (`http://127.0.0.1:8500/v1/kv/upstreams/app`).
    pub source: String,
    /// Where the list being served came from.
    pub origin: Origin,
    /// Version of the list in shared memory; every worker serves the same version.
    pub version: u64,
    pub consul_index: u64,
    pub last_change_ms: u64,
    pub last_sync_ms: u64,
    pub last_error: Option<String>,
    pub last_error_ms: u64,
    pub leader_pid: i64,
    /// Whether the upstream's watch works (`healthy`), is retrying after a failure (`failing`),
    /// or has not answered yet (`starting`).
    pub watch: WatchHealth,
    /// Restarts of the watch task after a panic, by the current leader.
    pub watch_restarts: u32,
}

#[derive(Serialize)]
struct Document<'a> {
    worker_pid: u32,
    upstreams: &'a [UpstreamView],
}

/// What the client asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShowRequest {
    /// `?NAME` (nginx-upsync-module) or `?upstream=NAME`.
    pub upstream: Option<String>,
    pub json: bool,
}

/// Reads the query string and `Accept` header: `?NAME`, `?upstream=NAME`, `?format=json`,
/// `Accept: application/json`.
pub fn parse_request(args: &str, accept: Option<&str>) -> ShowRequest {
    let mut req = ShowRequest { upstream: None, json: accept.is_some_and(|a| a.contains("application/json")) };
    for part in args.split('&').filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            Some(("format", f)) => req.json = f == "json",
            Some(("upstream", n)) => req.upstream = Some(n.to_string()),
            Some(_) => {}
            None => req.upstream = Some(part.to_string()),
        }
    }
    req
}

/// The text body, as nginx-upsync-module prints it.
pub fn render_text(upstreams: &[UpstreamView], selected: Option<&str>) -> String {
    let mut out = String::new();
    match selected {
        None if upstreams.is_empty() => out.push_str("No upstreams defined"),
        None => {
            for u in upstreams {
                text_upstream(&mut out, u);
                out.push('\n');
            }
        }
        Some(name) => match upstreams.iter().find(|u| u.name.eq_ignore_ascii_case(name)) {
            Some(u) => text_upstream(&mut out, u),
            None => out.push_str("The upstream you requested does not exist. Please double-check the name"),
        },
    }
    out
}

fn text_upstream(out: &mut String, u: &UpstreamView) {
    out.push_str(&format!("Upstream name: {}; Backend server count: {}\n", u.name, u.servers.len()));
    for s in &u.servers {
        out.push_str(&crate::dump::server_line("        ", &s.server));
        out.push('\n');
    }
}

/// The JSON body; `Err` carries the 404 message when the selected upstream does not exist.
pub fn render_json(upstreams: &[UpstreamView], selected: Option<&str>, worker_pid: u32) -> Result<String, String> {
    let chosen: Vec<UpstreamView> = match selected {
        None => upstreams.to_vec(),
        Some(name) => match upstreams.iter().find(|u| u.name.eq_ignore_ascii_case(name)) {
            Some(u) => vec![u.clone()],
            None => return Err(serde_json::json!({ "error": format!("no upstream named \"{name}\"") }).to_string()),
        },
    };
    Ok(serde_json::to_string_pretty(&Document { worker_pid, upstreams: &chosen }).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(name: &str, servers: &[(&str, u32, bool, bool)]) -> UpstreamView {
        UpstreamView {
            name: name.into(),
            servers: servers
                .iter()
                .map(|(a, w, down, backup)| ServerView {
                    server: ServerJson { server: a.to_string(), weight: *w, max_fails: 2, fail_timeout: 10, down: *down, backup: *backup },
                    fails: 0,
                    active: 0,
                })
                .collect(),
            sync: None,
        }
    }

    #[test]
    fn text_is_byte_for_byte_nginx_upsync_module() {
        let ups = [view("test", &[("127.0.0.1:8088", 10, false, false), ("127.0.0.1:8089", 1, true, false)]), view("other", &[])];
        assert_eq!(
            render_text(&ups, Some("test")),
            "Upstream name: test; Backend server count: 2\n        server 127.0.0.1:8088 weight=10 max_fails=2 fail_timeout=10s;\n        server 127.0.0.1:8089 weight=1 max_fails=2 fail_timeout=10s down;\n"
        );
        assert_eq!(
            render_text(&ups, None),
            "Upstream name: test; Backend server count: 2\n        server 127.0.0.1:8088 weight=10 max_fails=2 fail_timeout=10s;\n        server 127.0.0.1:8089 weight=1 max_fails=2 fail_timeout=10s down;\n\nUpstream name: other; Backend server count: 0\n\n"
        );
        assert_eq!(render_text(&ups, Some("TEST")).lines().count(), 3);
        assert_eq!(render_text(&ups, Some("nope")), "The upstream you requested does not exist. Please double-check the name");
        assert_eq!(render_text(&[], None), "No upstreams defined");
    }

    #[test]
    fn backups_are_listed_with_backup() {
        let t = render_text(&[view("b", &[("10.0.0.1:80", 1, false, true)])], Some("b"));
        assert!(t.ends_with("server 10.0.0.1:80 weight=1 max_fails=2 fail_timeout=10s backup;\n"), "{t}");
    }

    #[test]
    fn json_view() {
        let mut v = view("app", &[("127.0.0.1:1", 3, false, true)]);
        v.sync = Some(SyncView {
            source: "http://127.0.0.1:8500/v1/kv/upstreams/app".into(),
            origin: Origin::Consul,
            version: 4,
            consul_index: 99,
            last_change_ms: 1,
            last_sync_ms: 2,
            last_error: None,
            last_error_ms: 0,
            leader_pid: 10,
            watch: WatchHealth::Healthy,
            watch_restarts: 0,
        });
        let j: serde_json::Value = serde_json::from_str(&render_json(&[v], None, 123).unwrap()).unwrap();
        assert_eq!(j["worker_pid"], 123);
        let u = &j["upstreams"][0];
        assert_eq!(u["name"], "app");
        assert_eq!(u["servers"][0]["server"], "127.0.0.1:1");
        assert_eq!(u["servers"][0]["backup"], true);
        assert_eq!(u["servers"][0]["fails"], 0);
        assert_eq!(u["sync"]["consul_index"], 99);
        assert_eq!(u["sync"]["origin"], "consul");
        let e: serde_json::Value = serde_json::from_str(&render_json(&[], Some("x\""), 1).unwrap_err()).unwrap();
        assert_eq!(e["error"], "no upstream named \"x\"\"");
    }

    #[test]
    fn request_parsing() {
        assert_eq!(parse_request("app", None), ShowRequest { upstream: Some("app".into()), json: false });
        assert_eq!(parse_request("upstream=app&format=json", None), ShowRequest { upstream: Some("app".into()), json: true });
        assert_eq!(parse_request("", Some("application/json, */*")), ShowRequest { upstream: None, json: true });
        assert!(!parse_request("format=text", Some("application/json")).json);
    }
}
