//! `upstream_show`: nginx-upsync-module's text format, byte for byte, a JSON view with the
//! per-server state and the sync status, Prometheus metrics, and a live status page for
//! browsers. The FFI layer fills the view from nginx's peers and the shared slots; choosing the
//! format and rendering are here.
use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{Origin, Server, SlotMeta, WatchHealth};

/// One upstream as `upstream_show` lists it. Also what the stream module hands the HTTP module's
/// `upstream_show` (as JSON, `ffi/show.rs`), hence `Deserialize`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UpstreamView {
    pub name: String,
    pub servers: Vec<ServerView>,
    /// Present for upstreams synced by this module.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServerView {
    #[serde(flatten)]
    pub server: ServerJson,
    /// Failures counted by the answering worker (passive health: max_fails/fail_timeout).
    pub fails: u64,
    /// Requests the answering worker has in flight to this server.
    pub active: u64,
}

/// A server as JSON: the name as nginx prints it, the rest as configured.
#[derive(Clone, Debug, Serialize, Deserialize)]
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

#[derive(Clone, Debug, Serialize, Deserialize)]
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
    /// Sync errors recorded since the slot was created, by kind ([`crate::model::ErrorKind`]).
    pub errors: BTreeMap<Cow<'static, str>, u64>,
}

impl SyncView {
    /// The view of a slot: where it syncs from, its list version and its metadata.
    pub fn new(source: String, version: u64, meta: SlotMeta) -> SyncView {
        let errors = meta.error_counts().map(|(k, n)| (Cow::Borrowed(k.name()), n)).collect();
        SyncView {
            source,
            origin: meta.origin,
            version,
            consul_index: meta.consul_index,
            last_change_ms: meta.changed_ms,
            last_sync_ms: meta.synced_ms,
            last_error: meta.last_error,
            last_error_ms: meta.error_ms,
            leader_pid: meta.leader_pid,
            watch: meta.watch,
            watch_restarts: meta.watch_restarts,
            errors,
        }
    }
}

#[derive(Serialize)]
struct Document<'a> {
    worker_pid: u32,
    upstreams: &'a [UpstreamView],
    /// The stream module's upstreams, when it is loaded in the same nginx (absent when there
    /// are none, so the document of an HTTP-only nginx is unchanged).
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    stream_upstreams: &'a [UpstreamView],
}

/// The forms `upstream_show` answers in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// nginx-upsync-module's text.
    Text,
    Json,
    /// Prometheus / OpenMetrics text exposition ([`render_prometheus`]).
    Prometheus,
    /// The live status page for browsers ([`render_html`]).
    Html,
}

impl Format {
    /// A format named in configuration (the stream `upstream_show FORMAT;`, where a client sends
    /// no query): `text`, `json` or `prometheus`; an error naming the choices otherwise.
    pub fn from_conf(name: &str) -> Result<Format, String> {
        match name {
            "text" => Ok(Format::Text),
            "json" => Ok(Format::Json),
            "prometheus" | "openmetrics" => Ok(Format::Prometheus),
            other => Err(format!("unknown format \"{other}\": use text (the default), json or prometheus")),
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => "text/plain",
            Format::Json => "application/json",
            Format::Prometheus => OPENMETRICS_CONTENT_TYPE,
            Format::Html => "text/html; charset=utf-8",
        }
    }
}

/// What the client asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShowRequest {
    /// `?NAME` (nginx-upsync-module) or `?upstream=NAME`.
    pub upstream: Option<String>,
    pub format: Format,
}

/// Reads the query string and `Accept` header: `?NAME`, `?upstream=NAME`,
/// `?format=json|text|prometheus|html`; without `format`, the `Accept` header decides
/// ([`negotiate`]).
pub fn parse_request(args: &str, accept: Option<&str>) -> ShowRequest {
    let mut req = ShowRequest { upstream: None, format: accept.map(negotiate).unwrap_or(Format::Text) };
    for part in args.split('&').filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            Some(("format", f)) => {
                req.format = match f {
                    "json" => Format::Json,
                    "prometheus" | "openmetrics" | "metrics" => Format::Prometheus,
                    "html" => Format::Html,
                    _ => Format::Text,
                }
            }
            Some(("upstream", n)) => req.upstream = Some(n.to_string()),
            Some(_) => {}
            None => req.upstream = Some(part.to_string()),
        }
    }
    req
}

/// The format an `Accept` header prefers: the media range with the highest `q` among
/// `application/json`, `text/html`, `application/openmetrics-text` (and `text/plain` with a
/// `version` parameter: Prometheus' text format) and `text/plain` or `*/*` (nginx-upsync-module's
/// text); on equal `q` a named type beats a wildcard, then the first listed wins. So a browser
/// gets the page, a Prometheus scraper the metrics, `curl` the text.
pub fn negotiate(accept: &str) -> Format {
    let mut best: Option<(f32, bool, Format)> = None;
    for range in accept.split(',') {
        let mut params = range.split(';').map(str::trim);
        let media = params.next().unwrap_or("").to_ascii_lowercase();
        let (mut q, mut versioned) = (1.0f32, false);
        for p in params {
            match p.split_once('=').map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim())) {
                Some((k, v)) if k == "q" => q = v.parse().unwrap_or(0.0),
                Some((k, _)) if k == "version" => versioned = true,
                _ => {}
            }
        }
        let (format, specific) = match media.as_str() {
            "application/json" => (Format::Json, true),
            "text/html" | "application/xhtml+xml" => (Format::Html, true),
            "application/openmetrics-text" => (Format::Prometheus, true),
            "text/plain" if versioned => (Format::Prometheus, true),
            "text/plain" => (Format::Text, true),
            "*/*" | "text/*" => (Format::Text, false),
            _ => continue,
        };
        if q <= 0.0 {
            continue;
        }
        if best.is_none_or(|(bq, bs, _)| q > bq || (q == bq && specific && !bs)) {
            best = Some((q, specific, format));
        }
    }
    best.map(|(_, _, f)| f).unwrap_or(Format::Text)
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

/// The JSON body: the HTTP upstreams under `upstreams`, the stream module's (when it is loaded
/// in the same nginx) under `stream_upstreams`. `?NAME` selects one upstream, HTTP first, then
/// stream ([`select_both`]). `Err` carries the 404 message when the selected upstream exists in
/// neither.
pub fn render_json(upstreams: &[UpstreamView], stream: &[UpstreamView], selected: Option<&str>, worker_pid: u32) -> Result<String, String> {
    let (upstreams, stream_upstreams) =
        select_both(upstreams, stream, selected).map_err(|e| serde_json::json!({ "error": e }).to_string())?;
    Ok(serde_json::to_string_pretty(&Document { worker_pid, upstreams, stream_upstreams }).unwrap_or_default())
}

/// Whether the JSON or the page of a request needs the stream module's upstreams: not in the
/// text and Prometheus forms (HTTP only), nor when `?NAME` names an HTTP upstream (HTTP first).
pub fn wants_stream(format: Format, http: &[UpstreamView], selected: Option<&str>) -> bool {
    matches!(format, Format::Json | Format::Html) && selected.is_none_or(|name| select(http, Some(name)).is_err())
}

/// The HTTP and the stream upstreams a request selects: all of both, or the one named (an HTTP
/// upstream of that name first, else a stream one); `Err` when neither has it.
fn select_both<'a>(
    http: &'a [UpstreamView],
    stream: &'a [UpstreamView],
    selected: Option<&str>,
) -> Result<(&'a [UpstreamView], &'a [UpstreamView]), String> {
    match select(http, selected) {
        Ok(h) if selected.is_none() => Ok((h, stream)),
        Ok(h) => Ok((h, &[])),
        Err(e) => select(stream, selected).map(|s| (&http[..0], s)).map_err(|_| e),
    }
}

/// The upstreams a request selects (all, or the one named); `Err` when the named one does not
/// exist.
fn select<'a>(upstreams: &'a [UpstreamView], selected: Option<&str>) -> Result<&'a [UpstreamView], String> {
    match selected {
        None => Ok(upstreams),
        Some(name) => match upstreams.iter().position(|u| u.name.eq_ignore_ascii_case(name)) {
            Some(i) => Ok(&upstreams[i..=i]),
            None => Err(format!("no upstream named \"{name}\"")),
        },
    }
}

/// The content type of [`render_prometheus`]'s text (as upsync-dns serves its metrics).
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Prometheus metrics of the upstreams (`upsync_nginx_*`, OpenMetrics text, the same
/// encoder as upsync-dns). `leader_pid` is the lease holder (0: none), `now_ms` the time of
/// the scrape (for the age of the last sync). `Err` carries the 404 text when the selected
/// upstream does not exist.
pub fn render_prometheus(upstreams: &[UpstreamView], selected: Option<&str>, leader_pid: i64, now_ms: u64) -> Result<String, String> {
    let chosen = select(upstreams, selected)?;
    let scrape = metrics::Scrape::new(chosen, leader_pid, now_ms);
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(scrape));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).map_err(|e| format!("cannot encode the metrics: {e}"))?;
    Ok(out)
}

mod metrics {
    //! The collector behind [`super::render_prometheus`]: a snapshot of the upstreams taken at
    //! the scrape, encoded with prometheus-client's const metrics. Names follow Prometheus'
    //! conventions (`_total` counters, `_seconds`, base units) and upsync-dns' names for the same
    //! meanings (`..._consul_up`, `..._consul_errors_total`).
    use prometheus_client::collector::Collector;
    use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
    use prometheus_client::metrics::counter::ConstCounter;
    use prometheus_client::metrics::gauge::ConstGauge;
    use prometheus_client::metrics::MetricType;

    use super::{SyncView, UpstreamView};
    use crate::model::{Origin, WatchHealth};

    /// One upstream, reduced to what the metrics show (the server list can be 50,000 long).
    #[derive(Debug)]
    struct Upstream {
        /// Escaped for a label value.
        name: String,
        up: u64,
        down: u64,
        backup: u64,
        sync: Option<SyncView>,
    }

    #[derive(Debug)]
    pub(super) struct Scrape {
        upstreams: Vec<Upstream>,
        leader_pid: i64,
        now_ms: u64,
    }

    /// A label value as the exposition format writes it: prometheus-client 0.24 writes values
    /// as given, and an upstream name may hold `"` or `\`.
    fn escape(v: &str) -> String {
        let mut out = String::with_capacity(v.len());
        for c in v.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out
    }

    impl Scrape {
        pub(super) fn new(upstreams: &[UpstreamView], leader_pid: i64, now_ms: u64) -> Scrape {
            let upstreams = upstreams
                .iter()
                .map(|u| {
                    let (mut up, mut down, mut backup) = (0, 0, 0);
                    for s in &u.servers {
                        match (s.server.down, s.server.backup) {
                            (true, _) => down += 1,
                            (false, true) => backup += 1,
                            (false, false) => up += 1,
                        }
                    }
                    Upstream { name: escape(&u.name), up, down, backup, sync: u.sync.clone() }
                })
                .collect();
            Scrape { upstreams, leader_pid, now_ms }
        }

        fn synced(&self) -> impl Iterator<Item = (&str, &SyncView)> {
            self.upstreams.iter().filter_map(|u| u.sync.as_ref().map(|s| (u.name.as_str(), s)))
        }
    }

    /// Writes one gauge family: (labels, value) per sample.
    fn gauges<V: prometheus_client::encoding::EncodeGaugeValue + std::fmt::Debug + Send + Sync>(
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Vec<(&'static str, String)>, V)>,
    ) -> Result<(), std::fmt::Error> {
        let mut m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (labels, v) in samples {
            ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn counters(
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Vec<(&'static str, String)>, u64)>,
    ) -> Result<(), std::fmt::Error> {
        let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, v) in samples {
            ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn up(name: &str) -> Vec<(&'static str, String)> {
        vec![("upstream", name.to_string())]
    }

    impl Collector for Scrape {
        fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            let e = &mut e;
            ConstGauge::new(self.leader_pid).encode(e.encode_descriptor(
                "upsync_nginx_leader_pid",
                "PID of the nginx worker holding the Consul watches (the lease; 0: none)",
                None,
                MetricType::Gauge,
            )?)?;
            gauges(
                e,
                "upsync_nginx_upstream_servers",
                "Servers of the upstream as this worker balances them, by state (down: marked down; backup: backup, not down; up: the rest)",
                self.upstreams.iter().flat_map(|u| {
                    [("up", u.up), ("down", u.down), ("backup", u.backup)]
                        .map(|(state, n)| (vec![("upstream", u.name.clone()), ("state", state.to_string())], n as i64))
                }),
            )?;
            gauges(
                e,
                "upsync_nginx_list_version",
                "Version of the upstream's list in shared memory (moves at every change; every worker serves the same)",
                self.synced().map(|(n, s)| (up(n), s.version as i64)),
            )?;
            gauges(
                e,
                "upsync_nginx_consul_index",
                "X-Consul-Index of the last answer from Consul (0: none yet)",
                self.synced().map(|(n, s)| (up(n), s.consul_index as i64)),
            )?;
            gauges(
                e,
                "upsync_nginx_consul_up",
                "1 while the upstream's Consul watch succeeds, 0 while it fails or has not answered yet (the last list keeps serving)",
                self.synced().map(|(n, s)| (up(n), (s.watch == WatchHealth::Healthy) as i64)),
            )?;
            gauges(
                e,
                "upsync_nginx_watch_state",
                "State of the upstream's Consul watch: 1 for the current one of starting, healthy, failing",
                self.synced().flat_map(|(n, s)| {
                    [WatchHealth::Starting, WatchHealth::Healthy, WatchHealth::Failing].map(|w| {
                        let label = match w {
                            WatchHealth::Starting => "starting",
                            WatchHealth::Healthy => "healthy",
                            WatchHealth::Failing => "failing",
                        };
                        (vec![("upstream", n.to_string()), ("state", label.to_string())], (s.watch == w) as i64)
                    })
                }),
            )?;
            gauges(
                e,
                "upsync_nginx_list_origin",
                "Where the list being served came from: 1 for the current one of config, dump, consul",
                self.synced().flat_map(|(n, s)| {
                    [(Origin::Config, "config"), (Origin::Dump, "dump"), (Origin::Consul, "consul")]
                        .map(|(o, label)| (vec![("upstream", n.to_string()), ("origin", label.to_string())], (s.origin == o) as i64))
                }),
            )?;
            gauges(
                e,
                "upsync_nginx_last_sync_age_seconds",
                "Seconds since the last successful answer from Consul (absent until the first)",
                self.synced()
                    .filter(|(_, s)| s.last_sync_ms > 0)
                    .map(|(n, s)| (up(n), self.now_ms.saturating_sub(s.last_sync_ms) as f64 / 1000.0)),
            )?;
            gauges(
                e,
                "upsync_nginx_last_sync_timestamp_seconds",
                "Unix time of the last successful answer from Consul (0: none yet)",
                self.synced().map(|(n, s)| (up(n), s.last_sync_ms as f64 / 1000.0)),
            )?;
            gauges(
                e,
                "upsync_nginx_last_change_timestamp_seconds",
                "Unix time the upstream's list last changed",
                self.synced().map(|(n, s)| (up(n), s.last_change_ms as f64 / 1000.0)),
            )?;
            counters(
                e,
                "upsync_nginx_consul_errors",
                "Sync errors of the upstream by kind (connect, tls, timeout, transport, acl, http, decode, too_large, empty, zone_full, config, restart, other), since nginx started",
                self.synced().flat_map(|(n, s)| {
                    s.errors.iter().map(move |(kind, v)| (vec![("upstream", n.to_string()), ("kind", kind.to_string())], *v))
                }),
            )?;
            counters(
                e,
                "upsync_nginx_watch_restarts",
                "Restarts of the upstream's watch task after a panic, by the current leader",
                self.synced().map(|(n, s)| (up(n), u64::from(s.watch_restarts))),
            )?;
            Ok(())
        }
    }
}

/// The status page: one self-contained HTML document (inline CSS and script, no other
/// request than its own JSON) that shows `initial` (the JSON document of [`render_json`]) at
/// once and then polls the JSON form of the same URL every 500 ms, re-rendering in place.
pub fn render_html(initial_json: &str) -> String {
    // Inside <script>, "</script" or "<!--" in the data would end or change the element:
    // JSON allows "<" to be written \u003c, which no HTML parser looks into.
    let data = initial_json.replace('<', "\\u003c");
    STATUS_PAGE.replacen("/*INITIAL_JSON*/null", &data, 1)
}

const STATUS_PAGE: &str = include_str!("status.html");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_named_in_configuration() {
        assert_eq!(Format::from_conf("text"), Ok(Format::Text));
        assert_eq!(Format::from_conf("json"), Ok(Format::Json));
        assert_eq!(Format::from_conf("prometheus"), Ok(Format::Prometheus));
        let e = Format::from_conf("html").unwrap_err();
        assert!(e.contains("\"html\"") && e.contains("json or prometheus"), "{e}");
    }

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
            errors: BTreeMap::from([("connect".into(), 2)]),
        });
        let j: serde_json::Value = serde_json::from_str(&render_json(&[v], &[], None, 123).unwrap()).unwrap();
        assert_eq!(j["worker_pid"], 123);
        let u = &j["upstreams"][0];
        assert_eq!(u["name"], "app");
        assert_eq!(u["servers"][0]["server"], "127.0.0.1:1");
        assert_eq!(u["servers"][0]["backup"], true);
        assert_eq!(u["servers"][0]["fails"], 0);
        assert_eq!(u["sync"]["consul_index"], 99);
        assert_eq!(u["sync"]["origin"], "consul");
        assert_eq!(u["sync"]["errors"]["connect"], 2);
        let e: serde_json::Value = serde_json::from_str(&render_json(&[], &[], Some("x\""), 1).unwrap_err()).unwrap();
        assert_eq!(e["error"], "no upstream named \"x\"\"");
    }

    #[test]
    fn stream_upstreams_have_their_own_key() {
        let http = [view("app", &[("127.0.0.1:1", 1, false, false)])];
        let stream = [synced("db", &[("127.0.0.1:2", 2, false, true)], |_| {}), view("app", &[])];
        let doc = |selected| -> serde_json::Value { serde_json::from_str(&render_json(&http, &stream, selected, 1).unwrap()).unwrap() };
        let all = doc(None);
        assert_eq!(all["upstreams"].as_array().unwrap().len(), 1);
        assert_eq!(all["stream_upstreams"][0]["name"], "db");
        assert_eq!(all["stream_upstreams"][0]["servers"][0]["backup"], true);
        assert_eq!(all["stream_upstreams"][0]["sync"]["source"], "http://127.0.0.1:8500/v1/kv/upstreams/db");
        assert_eq!(all["stream_upstreams"][1]["name"], "app");
        // ?NAME: an HTTP upstream first, then a stream one.
        let app = doc(Some("app"));
        assert_eq!(app["upstreams"][0]["name"], "app");
        assert!(app.get("stream_upstreams").is_none(), "{app}");
        let db = doc(Some("db"));
        assert_eq!(db["upstreams"], serde_json::json!([]));
        assert_eq!(db["stream_upstreams"][0]["name"], "db");
        assert_eq!(db["stream_upstreams"].as_array().unwrap().len(), 1);
        let e: serde_json::Value = serde_json::from_str(&render_json(&http, &stream, Some("nope"), 1).unwrap_err()).unwrap();
        assert_eq!(e["error"], "no upstream named \"nope\"");
        // Without stream upstreams the document is the HTTP-only one.
        let only: serde_json::Value = serde_json::from_str(&render_json(&http, &[], None, 1).unwrap()).unwrap();
        assert_eq!(only.as_object().unwrap().keys().collect::<Vec<_>>(), ["upstreams", "worker_pid"]);
    }

    #[test]
    fn views_come_back_from_their_json() {
        // What the stream module hands the HTTP module: the views as JSON, read back.
        let views = [
            synced("db", &[("127.0.0.1:2", 2, true, false)], |s| {
                s.errors.insert("connect".into(), 3);
            }),
            view("x", &[]),
        ];
        let json = serde_json::to_vec(&views).unwrap();
        let back: Vec<UpstreamView> = serde_json::from_slice(&json).unwrap();
        assert_eq!(serde_json::to_vec(&back).unwrap(), json);
        assert!(back[1].sync.is_none());
    }

    #[test]
    fn only_json_and_the_page_ask_for_stream_upstreams() {
        let http = [view("app", &[])];
        assert!(wants_stream(Format::Json, &http, None));
        assert!(wants_stream(Format::Html, &http, Some("db")));
        assert!(!wants_stream(Format::Json, &http, Some("app")), "an HTTP upstream of that name comes first");
        assert!(!wants_stream(Format::Text, &http, None), "the text is nginx-upsync-module's, HTTP only");
        assert!(!wants_stream(Format::Prometheus, &http, None));
    }

    #[test]
    fn request_parsing() {
        let req = |upstream: Option<&str>, format| ShowRequest { upstream: upstream.map(str::to_string), format };
        assert_eq!(parse_request("app", None), req(Some("app"), Format::Text));
        assert_eq!(parse_request("upstream=app&format=json", None), req(Some("app"), Format::Json));
        assert_eq!(parse_request("", Some("application/json, */*")), req(None, Format::Json));
        assert_eq!(parse_request("format=text", Some("application/json")), req(None, Format::Text));
        assert_eq!(parse_request("format=prometheus", None), req(None, Format::Prometheus));
        assert_eq!(parse_request("app&format=html", None), req(Some("app"), Format::Html));
        assert_eq!(parse_request("format=json", Some("text/html")), req(None, Format::Json));
    }

    #[test]
    fn accept_negotiation() {
        // Chromium's and Firefox's Accept for a page.
        assert_eq!(
            negotiate("text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,image/apng,*/*;q=0.8"),
            Format::Html
        );
        // Prometheus 2.x/3.x scrapers.
        assert_eq!(
            negotiate("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"),
            Format::Prometheus
        );
        assert_eq!(negotiate("text/plain;version=0.0.4;q=0.3,*/*;q=0.2"), Format::Prometheus);
        // curl, fetch(), nginx-upsync-module's users.
        assert_eq!(negotiate("*/*"), Format::Text);
        assert_eq!(negotiate("text/plain"), Format::Text);
        assert_eq!(negotiate(""), Format::Text);
        assert_eq!(negotiate("*/*, application/json"), Format::Json, "a named type beats a wildcard of the same q");
        assert_eq!(negotiate("application/json;q=0.5, text/html"), Format::Html);
        assert_eq!(negotiate("text/html;q=0, application/json"), Format::Json);
        assert_eq!(negotiate("image/png"), Format::Text);
    }

    fn synced(name: &str, servers: &[(&str, u32, bool, bool)], sync: impl FnOnce(&mut SyncView)) -> UpstreamView {
        let mut v = view(name, servers);
        let mut s = SyncView {
            source: format!("http://127.0.0.1:8500/v1/kv/upstreams/{name}"),
            origin: Origin::Consul,
            version: 7,
            consul_index: 1234,
            last_change_ms: 1_700_000_000_000,
            last_sync_ms: 1_700_000_010_000,
            last_error: None,
            last_error_ms: 0,
            leader_pid: 42,
            watch: WatchHealth::Healthy,
            watch_restarts: 1,
            errors: crate::model::ErrorKind::ALL.iter().map(|k| (k.name().into(), 0)).collect(),
        };
        sync(&mut s);
        v.sync = Some(s);
        v
    }

    /// The samples of an OpenMetrics text: "name{labels}" -> value.
    fn samples(text: &str) -> BTreeMap<String, f64> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (k, v) = l.rsplit_once(' ').unwrap();
                (k.to_string(), v.parse().unwrap())
            })
            .collect()
    }

    #[test]
    fn prometheus_metrics() {
        let ups = [
            synced("app", &[("10.0.0.1:80", 1, false, false), ("10.0.0.2:80", 1, true, false), ("10.0.0.3:80", 1, false, true)], |s| {
                s.errors.insert("connect".into(), 3);
                s.errors.insert("empty".into(), 1);
            }),
            synced("new", &[], |s| {
                s.last_sync_ms = 0;
                s.consul_index = 0;
                s.origin = Origin::Dump;
                s.watch = WatchHealth::Failing;
            }),
            view("static", &[("127.0.0.1:9", 1, false, false)]),
        ];
        let text = render_prometheus(&ups, None, 42, 1_700_000_012_500).unwrap();
        assert!(text.ends_with("# EOF\n"), "{text}");
        let m = samples(&text);
        let get = |k: &str| *m.get(k).unwrap_or_else(|| panic!("no sample {k} in:\n{text}"));
        assert_eq!(get("upsync_nginx_leader_pid"), 42.0);
        assert_eq!(get(r#"upsync_nginx_upstream_servers{upstream="app",state="up"}"#), 1.0);
        assert_eq!(get(r#"upsync_nginx_upstream_servers{upstream="app",state="down"}"#), 1.0);
        assert_eq!(get(r#"upsync_nginx_upstream_servers{upstream="app",state="backup"}"#), 1.0);
        assert_eq!(get(r#"upsync_nginx_upstream_servers{upstream="static",state="up"}"#), 1.0);
        assert_eq!(get(r#"upsync_nginx_list_version{upstream="app"}"#), 7.0);
        assert_eq!(get(r#"upsync_nginx_consul_index{upstream="app"}"#), 1234.0);
        assert_eq!(get(r#"upsync_nginx_consul_up{upstream="app"}"#), 1.0);
        assert_eq!(get(r#"upsync_nginx_consul_up{upstream="new"}"#), 0.0);
        assert_eq!(get(r#"upsync_nginx_watch_state{upstream="new",state="failing"}"#), 1.0);
        assert_eq!(get(r#"upsync_nginx_watch_state{upstream="new",state="healthy"}"#), 0.0);
        assert_eq!(get(r#"upsync_nginx_list_origin{upstream="new",origin="dump"}"#), 1.0);
        assert_eq!(get(r#"upsync_nginx_last_sync_age_seconds{upstream="app"}"#), 2.5);
        assert_eq!(get(r#"upsync_nginx_last_sync_timestamp_seconds{upstream="app"}"#), 1_700_000_010.0);
        assert_eq!(get(r#"upsync_nginx_last_change_timestamp_seconds{upstream="app"}"#), 1_700_000_000.0);
        assert_eq!(get(r#"upsync_nginx_consul_errors_total{upstream="app",kind="connect"}"#), 3.0);
        assert_eq!(get(r#"upsync_nginx_consul_errors_total{upstream="app",kind="empty"}"#), 1.0);
        assert_eq!(get(r#"upsync_nginx_consul_errors_total{upstream="app",kind="zone_full"}"#), 0.0);
        assert_eq!(get(r#"upsync_nginx_watch_restarts_total{upstream="app"}"#), 1.0);
        // Never synced: no age (a gauge of "forever" would be a lie), the timestamp says 0.
        assert!(!m.contains_key(r#"upsync_nginx_last_sync_age_seconds{upstream="new"}"#), "{text}");
        assert_eq!(get(r#"upsync_nginx_last_sync_timestamp_seconds{upstream="new"}"#), 0.0);
        // A stock upstream has servers but no sync metrics.
        assert!(!text.contains(r#"upsync_nginx_list_version{upstream="static"}"#), "{text}");
        assert!(text.contains("# TYPE upsync_nginx_consul_errors counter"), "{text}");
        assert!(text.contains("# TYPE upsync_nginx_consul_up gauge"), "{text}");

        let one = render_prometheus(&ups, Some("APP"), 42, 0).unwrap();
        assert!(one.contains(r#"upstream="app""#) && !one.contains(r#"upstream="new""#), "{one}");
        assert_eq!(render_prometheus(&ups, Some("nope"), 0, 0).unwrap_err(), "no upstream named \"nope\"");
    }

    #[test]
    fn label_values_are_escaped() {
        let text = render_prometheus(&[view("a\"b\\c", &[])], None, 0, 0).unwrap();
        assert!(text.contains(r#"upsync_nginx_upstream_servers{upstream="a\"b\\c",state="up"} 0"#), "{text}");
    }

    #[test]
    fn status_page_embeds_the_json_safely() {
        let v = synced("app", &[("10.0.0.1:80", 1, false, false)], |s| s.last_error = Some("</script><script>alert(1)</script>".into()));
        let json = render_json(&[v], &[], None, 9).unwrap();
        let page = render_html(&json);
        assert!(page.starts_with("<!DOCTYPE html>"), "{page}");
        assert!(!page.contains("</script><script>alert"), "the data ended the script element");
        // The embedded document is the JSON, intact once the HTML parser is done with it.
        let start = page.find(r#"<script type="application/json" id="initial">"#).unwrap();
        let body = &page[start..];
        let body = &body[body.find('>').unwrap() + 1..body.find("</script>").unwrap()];
        let back: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(back["upstreams"][0]["sync"]["last_error"], "</script><script>alert(1)</script>");
        // Self-contained: no URL to fetch besides its own JSON.
        for needle in ["http://", "https://", "src=", "href=", "@import", "url("] {
            assert!(!STATUS_PAGE.contains(needle), "the page refers to {needle}");
        }
        assert_eq!(STATUS_PAGE.matches("/*INITIAL_JSON*/null").count(), 1);
    }
}
