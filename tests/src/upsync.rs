//! Helpers for tests of the nginx module: upstream blocks, KV server entries, counting which
//! backend answers, and reading `upstream_show`.
use std::collections::BTreeMap;
use std::time::Duration;

use crate::consul::Consul;
use crate::net::{http_get, http_request};
use crate::nginx::Nginx;
use crate::wait::wait_for;

/// An http{} body with one synced upstream `name` watching `/v1/kv/upstreams/<name>` on
/// `consul`, a server proxying `/` to it and `/show` with `upstream_show`. `params` go on the
/// upsync line (default `upsync_interval=10ms` unless `params` sets it), `lines` into the
/// upstream block.
pub fn http_block(name: &str, consul: &str, params: &str, lines: &str) -> String {
    format!(
        "{}
        server {{
            listen 127.0.0.1:{{{{port}}}};
            location / {{
                proxy_pass http://{name};
                proxy_http_version 1.1;
                proxy_set_header Connection \"\";
                proxy_next_upstream error timeout http_502;
            }}
            location = /show {{ upstream_show; }}
        }}",
        upstream_block(name, consul, params, lines)
    )
}

/// An `upstream {name} {}` block (http or stream) synced from `/v1/kv/upstreams/<name>` on
/// `consul`, with a placeholder server; `params` go on the upsync line (default
/// `upsync_interval=10ms` unless `params` sets it), `lines` into the block.
pub fn upstream_block(name: &str, consul: &str, params: &str, lines: &str) -> String {
    let params = if params.contains("upsync_interval=") { params.to_string() } else { format!("upsync_interval=10ms {params}") };
    format!(
        "upstream {name} {{
            server 127.0.0.1:9;
            upsync {consul}/v1/kv/upstreams/{name} upsync_timeout=30s {params};
            {lines}
        }}"
    )
}

/// `PUT /v1/kv/upstreams/<upstream>/<addr>` with `value` (JSON or empty).
pub fn put_server(consul: &Consul, upstream: &str, addr: &str, value: &str) {
    consul.kv_put(&format!("upstreams/{upstream}/{addr}"), value);
}

pub fn delete_server(consul: &Consul, upstream: &str, addr: &str) {
    consul.kv_delete(&format!("upstreams/{upstream}/{addr}"));
}

/// Sends `n` requests to `url` (new connection each) and counts answers by body (backend name);
/// non-200 answers count under "HTTP <status>", transport errors under "error".
pub fn hits(url: &str, n: usize) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for _ in 0..n {
        let key = match http_get(url) {
            Ok((200, body)) => body,
            Ok((status, _)) => format!("HTTP {status}"),
            Err(_) => "error".to_string(),
        };
        *m.entry(key).or_insert(0) += 1;
    }
    m
}

/// `upstream_show` as JSON for one upstream (the answering worker's view).
pub fn show_json(nginx: &Nginx, upstream: &str) -> serde_json::Value {
    let (status, body) =
        http_request("GET", &nginx.url(&format!("/show?upstream={upstream}&format=json")), &[], None).expect("upstream_show request");
    assert_eq!(status, 200, "upstream_show: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("upstream_show JSON: {e}: {body}"));
    v["upstreams"][0].clone()
}

/// The entry of server `addr` in `upstream_show`'s JSON for `upstream`, if listed.
pub fn shown_server(nginx: &Nginx, upstream: &str, addr: &str) -> Option<serde_json::Value> {
    show_json(nginx, upstream)["servers"].as_array()?.iter().find(|s| s["server"] == addr).cloned()
}

/// Waits until server `addr` of `upstream` has `field` equal to `value` in `upstream_show`.
pub fn wait_server_field(nginx: &Nginx, upstream: &str, addr: &str, field: &str, value: serde_json::Value) {
    crate::wait_until(&format!("{upstream}: {addr} {field}={value}"), Duration::from_secs(20), || {
        shown_server(nginx, upstream, addr).is_some_and(|s| s[field] == value)
    });
}

/// The `server` names `upstream_show` lists (sorted).
pub fn shown_servers(nginx: &Nginx, upstream: &str) -> Vec<String> {
    server_names(&show_json(nginx, upstream))
}

/// The `server` names of one upstream of `upstream_show`'s JSON (sorted).
pub fn server_names(upstream: &serde_json::Value) -> Vec<String> {
    let mut v: Vec<String> = upstream["servers"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s["server"].as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Waits until requests see exactly `expected` servers (sorted comparison) and returns the version.
pub fn wait_servers(nginx: &Nginx, upstream: &str, expected: &[&str]) -> u64 {
    let mut want: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    want.sort();
    wait_for(&format!("upstream {upstream} to list {want:?}"), Duration::from_secs(20), || {
        let s = show_json(nginx, upstream);
        (server_names(&s) == want).then(|| s["sync"]["version"].as_u64().unwrap_or(0))
    })
}

/// Answers of `n` requests that all came back 200, as backend name -> count; panics otherwise.
pub fn all_ok(url: &str, n: usize) -> BTreeMap<String, usize> {
    let h = hits(url, n);
    assert!(h.keys().all(|k| !k.starts_with("HTTP") && k != "error"), "failed requests: {h:?}");
    h
}

/// How many servers `upstream_show` lists for `upstream`.
pub fn shown_count(nginx: &Nginx, upstream: &str) -> usize {
    show_json(nginx, upstream)["servers"].as_array().map(Vec::len).unwrap_or(0)
}

/// Which backend answers each key `key0`..`key<keys-1>` (sent as `?k=KEY`) on `nginx`'s `path`
/// (hash balancing tests); panics on any answer but 200.
pub fn key_mapping(nginx: &Nginx, path: &str, keys: usize) -> Vec<String> {
    (0..keys)
        .map(|k| match http_get(&nginx.url(&format!("{path}?k=key{k}"))) {
            Ok((200, body)) => body,
            other => panic!("key{k} on {path}: {other:?}"),
        })
        .collect()
}

/// `IP:PORT` addresses in the module's peer order for one IP: by port.
pub fn sort_by_port(addrs: &mut [String]) {
    addrs.sort_by_key(|a| a.rsplit(':').next().and_then(|p| p.parse::<u16>().ok()).unwrap_or(0));
}
