//! The scheduler's HTTP API (documented in `sidecar/openapi.yaml`):
//!
//! - `PUT /v1/endpoints/{service}/{id}`: create or replace an endpoint (idempotent).
//! - `DELETE /v1/endpoints/{service}/{id}[?drain=DURATION|true]`: remove it, after a drain.
//! - `GET /v1/endpoints[/{service}]`: this node's endpoints (containers' and the API's).
//! - `GET /healthz`: the sidecar's connections; always 200 while the process serves.
//! - `GET /metrics`: the same state as Prometheus metrics ([`crate::metrics`]).
//!
//! Errors are JSON `{"error", "field", "reason"}` with a 4xx status. With a token configured,
//! `/v1/` requires `Authorization: Bearer TOKEN`.
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::model::{
    forbidden_address, format_go_duration, parse_go_duration, parse_host, validate_check_duration, validate_endpoint_id,
    validate_fail_timeout, validate_max_fails, validate_meta, validate_service_name, validate_tag, validate_weight, CheckKind, CheckSpec,
    EndpointSpec, Protocol, Source,
};
use crate::state::{DeleteOutcome, LockState, PutOutcome, Shared};

/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;

/// A 4xx answer naming the field at fault.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    field: Option<String>,
    reason: String,
}

impl ApiError {
    fn bad(field: impl Into<String>, reason: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::BAD_REQUEST, field: Some(field.into()), reason: reason.into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let error = match &self.field {
            Some(f) => format!("{f}: {}", self.reason),
            None => self.reason.clone(),
        };
        let mut r = (self.status, Json(json!({"error": error, "field": self.field, "reason": self.reason}))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"upsync-sidecar\""));
        }
        r
    }
}

/// The body of `PUT /v1/endpoints/{service}/{id}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PutBody {
    address: Option<String>,
    port: Option<i64>,
    weight: Option<i64>,
    max_fails: Option<i64>,
    /// Seconds, or a duration string (`30s`).
    fail_timeout: Option<serde_json::Value>,
    #[serde(default)]
    backup: bool,
    #[serde(default)]
    down: bool,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    meta: BTreeMap<String, String>,
    check: Option<CheckBody>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckBody {
    http: Option<String>,
    tcp: Option<bool>,
    ttl: Option<String>,
    interval: Option<String>,
    timeout: Option<String>,
    deregister_critical_service_after: Option<String>,
}

fn range(field: &str, v: Option<i64>, default: u32, check: fn(u32) -> Result<(), String>) -> Result<u32, ApiError> {
    match v {
        None => Ok(default),
        Some(n) => {
            let n = u32::try_from(n).map_err(|_| ApiError::bad(field, format!("{n} is out of range")))?;
            check(n).map_err(|e| ApiError::bad(field, e))?;
            Ok(n)
        }
    }
}

fn duration(field: &str, v: Option<&str>, default: Duration) -> Result<Duration, ApiError> {
    match v {
        None => Ok(default),
        Some(s) => {
            let d = parse_go_duration(s).map_err(|e| ApiError::bad(field, e))?;
            validate_check_duration(d).map_err(|e| ApiError::bad(field, e))?;
            Ok(d)
        }
    }
}

/// An HTTP check is a path (`/health`: the endpoint's own address) or an `http`/`https` URL
/// whose host the address rules allow (the Consul agent fetches it: a metadata address would
/// hand it the host's credentials). Control characters, spaces and user information are
/// refused. The URL is read by the `url` crate (WHATWG rules, which also read hex and octal
/// IPv4 forms), after the scheme is checked on the raw text as Consul will see it.
fn check_url(h: &str, allowed: &[ipnet::IpNet]) -> Result<(), ApiError> {
    let field = "check.http";
    if h.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ApiError::bad(field, "has spaces or control characters"));
    }
    if h.starts_with('/') && !h.starts_with("//") {
        return Ok(());
    }
    match h.split_once("://") {
        Some(("http", _)) | Some(("https", _)) => {}
        Some((scheme, _)) => {
            return Err(ApiError::bad(field, format!("scheme `{scheme}` is not allowed; give a path starting with / or an http(s):// URL")))
        }
        None => return Err(ApiError::bad(field, "give a path starting with / or an http(s):// URL")),
    }
    let url = url::Url::parse(h).map_err(|e| ApiError::bad(field, format!("not a URL ({e})")))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ApiError::bad(field, "user information (user@host) is not allowed in a check URL"));
    }
    let host = match url.host() {
        Some(url::Host::Ipv4(ip)) => upsync_discovery::Host::Ip(ip.into()),
        Some(url::Host::Ipv6(ip)) => upsync_discovery::Host::Ip(ip.into()),
        Some(url::Host::Domain(d)) => parse_host(d).map_err(|e| ApiError::bad(field, format!("host: {e}")))?,
        None => return Err(ApiError::bad(field, "the URL has no host")),
    };
    if let Some(why) = forbidden_address(&host, allowed) {
        return Err(ApiError::bad(field, why));
    }
    Ok(())
}

/// Turns a request into an endpoint, or names the first field at fault.
fn validate(shared: &Shared, service: &str, id: &str, body: &[u8]) -> Result<EndpointSpec, ApiError> {
    validate_service_name(service).map_err(|e| ApiError::bad("service", e))?;
    validate_endpoint_id(id).map_err(|e| ApiError::bad("id", e))?;
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| ApiError::bad("body", format!("not valid JSON ({e})")))?;
    if !value.is_object() {
        return Err(ApiError::bad("body", "must be a JSON object of endpoint fields"));
    }
    let b: PutBody =
        serde_path_to_error::deserialize(value).map_err(|e| ApiError::bad(e.path().to_string(), e.into_inner().to_string()))?;
    let s = &shared.settings;
    let address = match &b.address {
        Some(a) => {
            let host = parse_host(a).map_err(|e| ApiError::bad("address", e))?;
            if let Some(why) = forbidden_address(&host, &s.allow_addresses) {
                return Err(ApiError::bad("address", why));
            }
            host
        }
        None => upsync_discovery::Host::Ip(s.advertise_ip),
    };
    let port = match b.port {
        None => return Err(ApiError::bad("port", "required")),
        Some(p) => {
            u16::try_from(p).ok().filter(|p| *p != 0).ok_or_else(|| ApiError::bad("port", format!("{p} is not a port (1-65535)")))?
        }
    };
    let weight = range("weight", b.weight, s.defaults.weight, validate_weight)?;
    let max_fails = range("max_fails", b.max_fails, s.defaults.max_fails, validate_max_fails)?;
    let fail_timeout = match &b.fail_timeout {
        None => s.defaults.fail_timeout,
        Some(serde_json::Value::Number(n)) => range("fail_timeout", n.as_i64().or(Some(-1)), 0, validate_fail_timeout)?,
        Some(serde_json::Value::String(t)) => {
            let d = parse_go_duration(t).map_err(|e| ApiError::bad("fail_timeout", e))?;
            range("fail_timeout", Some(d.as_secs().min(i64::MAX as u64) as i64), 0, validate_fail_timeout)?
        }
        Some(_) => return Err(ApiError::bad("fail_timeout", "give seconds (30) or a duration (\"30s\")")),
    };
    let mut tags: Vec<String> = Vec::new();
    for (i, t) in b.tags.iter().enumerate() {
        validate_tag(t).map_err(|e| ApiError::bad(format!("tags[{i}]"), e))?;
        if !tags.contains(t) {
            tags.push(t.clone());
        }
    }
    validate_meta(&b.meta).map_err(|(f, e)| ApiError::bad(f, e))?;
    let check = match b.check {
        None => None,
        Some(c) => {
            let kinds = usize::from(c.http.is_some()) + usize::from(c.tcp == Some(true)) + usize::from(c.ttl.is_some());
            if kinds != 1 {
                return Err(ApiError::bad("check", "give exactly one of http, tcp (true) or ttl"));
            }
            let kind = if let Some(h) = c.http {
                check_url(&h, &s.allow_addresses)?;
                CheckKind::Http(h)
            } else if c.tcp == Some(true) {
                CheckKind::Tcp
            } else {
                CheckKind::Ttl(duration("check.ttl", c.ttl.as_deref(), Duration::from_secs(30))?)
            };
            let deregister_after = match c.deregister_critical_service_after.as_deref() {
                None => None,
                Some(v) => {
                    let d = parse_go_duration(v).map_err(|e| ApiError::bad("check.deregister_critical_service_after", e))?;
                    if d < Duration::from_secs(60) {
                        return Err(ApiError::bad(
                            "check.deregister_critical_service_after",
                            format!("{} is below Consul's minimum of 1m", format_go_duration(d)),
                        ));
                    }
                    Some(d)
                }
            };
            Some(CheckSpec {
                kind,
                interval: duration("check.interval", c.interval.as_deref(), s.defaults.check_interval)?,
                timeout: duration("check.timeout", c.timeout.as_deref(), s.defaults.check_timeout)?,
                deregister_after,
            })
        }
    };
    Ok(EndpointSpec {
        service: service.to_string(),
        id: id.to_string(),
        address,
        port,
        protocol: Protocol::Tcp,
        weight,
        max_fails,
        fail_timeout,
        backup: b.backup,
        down: b.down,
        tags,
        meta: b.meta,
        check,
        source: Source::Api,
    })
}

async fn put_endpoint(
    State(shared): State<Arc<Shared>>,
    Path((service, id)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let spec = validate(&shared, &service, &id, &body)?;
    let outcome =
        shared.api_put(spec).map_err(|c| ApiError { status: StatusCode::CONFLICT, field: Some(c.field.into()), reason: c.reason })?;
    durable(&shared).await?;
    let view = shared.list(Some(&service)).into_iter().find(|v| v.spec.id == id);
    let (status, result) = match outcome {
        PutOutcome::Created => (StatusCode::CREATED, "created"),
        PutOutcome::Updated => (StatusCode::OK, "updated"),
        PutOutcome::Unchanged => (StatusCode::OK, "unchanged"),
    };
    Ok((status, Json(json!({"result": result, "endpoint": view}))).into_response())
}

async fn delete_endpoint(
    State(shared): State<Arc<Shared>>,
    Path((service, id)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    validate_service_name(&service).map_err(|e| ApiError::bad("service", e))?;
    validate_endpoint_id(&id).map_err(|e| ApiError::bad("id", e))?;
    if let Some(k) = q.keys().find(|k| k.as_str() != "drain") {
        return Err(ApiError::bad(k.clone(), "unknown query parameter (only drain is known)"));
    }
    let drain = match q.get("drain").map(|s| s.trim()) {
        None | Some("false") | Some("0") => None,
        Some("true") | Some("") => Some(shared.settings.drain),
        Some(d) => {
            let d = parse_go_duration(d).map_err(|e| ApiError::bad("drain", format!("{e}, or true for the default period")))?;
            if d > Duration::from_secs(3600) {
                return Err(ApiError::bad("drain", "longer than 1h"));
            }
            Some(d)
        }
    };
    let outcome = shared.api_delete(&service, &id, drain);
    if !matches!(outcome, DeleteOutcome::Conflict(_)) {
        durable(&shared).await?;
    }
    Ok(match outcome {
        DeleteOutcome::Deleted => (StatusCode::OK, Json(json!({"result": "deleted"}))).into_response(),
        DeleteOutcome::NotFound => (StatusCode::OK, Json(json!({"result": "absent"}))).into_response(),
        DeleteOutcome::Draining { until } => (
            StatusCode::ACCEPTED,
            Json(json!({"result": "draining", "drain": format_go_duration(Duration::from_millis(until.as_millis() as u64))})),
        )
            .into_response(),
        DeleteOutcome::Conflict(c) => return Err(ApiError { status: StatusCode::CONFLICT, field: Some(c.field.into()), reason: c.reason }),
    })
}

/// A change is answered 2xx only once it is on disk (see [`crate::journal`]); otherwise 503,
/// naming the file: the change is kept in memory and applied if the sidecar keeps running,
/// but the caller should repeat it.
async fn durable(shared: &Arc<Shared>) -> Result<(), ApiError> {
    let s = Arc::clone(shared);
    let r = tokio::task::spawn_blocking(move || s.persist_calls()).await.unwrap_or_else(|e| Err(format!("recording task failed: {e}")));
    r.map_err(|e| {
        tracing::error!("{e}");
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            field: Some("state_dir".into()),
            reason: format!("{e}; the change is not durable: repeat the call once the state directory is writable"),
        }
    })
}

async fn list_all(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.list(None)).into_response()
}

async fn list_service(State(shared): State<Arc<Shared>>, Path(service): Path<String>) -> Result<Response, ApiError> {
    validate_service_name(&service).map_err(|e| ApiError::bad("service", e))?;
    Ok(Json(shared.list(Some(&service))).into_response())
}

async fn healthz(State(shared): State<Arc<Shared>>) -> Response {
    let (status, pending, endpoints) = shared.status();
    let engine_enabled = shared.settings.engine_enabled;
    let lock_ok = matches!(status.lock, LockState::Held | LockState::Unavailable(_));
    let ok = status.consul_reachable && (status.engine_connected || !engine_enabled) && lock_ok;
    let conflict = matches!(status.lock, LockState::Conflict(_));
    let (lock_state, lock_error) = match &status.lock {
        LockState::Waiting => ("waiting", None),
        LockState::Held => ("held", None),
        LockState::Conflict(e) => ("conflict", Some(e.clone())),
        LockState::Unavailable(e) => ("unavailable", Some(e.clone())),
    };
    Json(json!({
        "status": if conflict { "conflict" } else if ok { "ok" } else { "degraded" },
        "node": shared.settings.node_id,
        "endpoints": endpoints,
        "lock": {
            "key": crate::lock::lock_key(&shared),
            "state": lock_state,
            "error": lock_error,
        },
        "invalid_records": status.invalid_records,
        "consul": {
            "reachable": status.consul_reachable,
            "error": status.consul_error,
            "pending_changes": pending,
            "last_reconcile_seconds_ago": status.last_reconcile.map(|t| t.elapsed().as_secs()),
        },
        "engine": {
            "enabled": engine_enabled,
            "connected": status.engine_connected,
            "error": status.engine_error,
            "socket": shared.settings.docker_socket,
        },
    }))
    .into_response()
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let (status, pending_changes, endpoints) = shared.status();
    let snapshot = crate::metrics::Snapshot { status: &status, pending_changes, endpoints, engine_enabled: shared.settings.engine_enabled };
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], crate::metrics::render(&snapshot)).into_response()
}

/// Constant-time comparison, so response timing does not reveal how much of a guess matched.
fn same_token(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

async fn require_token(State(shared): State<Arc<Shared>>, headers: HeaderMap, req: Request, next: Next) -> Response {
    if let Some(token) = &shared.settings.api_token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim);
        if !given.is_some_and(|g| same_token(g.as_bytes(), token.expose().as_bytes())) {
            return ApiError {
                status: StatusCode::UNAUTHORIZED,
                field: Some("Authorization".into()),
                reason: "missing or wrong bearer token".into(),
            }
            .into_response();
        }
    }
    next.run(req).await
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        field: None,
        reason: "no such resource; see sidecar/openapi.yaml (/v1/endpoints, /healthz, /metrics)".into(),
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError { status: StatusCode::METHOD_NOT_ALLOWED, field: None, reason: "method not allowed on this resource".into() }
}

/// The API's router.
pub fn router(shared: Arc<Shared>) -> Router {
    let v1 = Router::new()
        .route("/v1/endpoints", get(list_all))
        .route("/v1/endpoints/{service}", get(list_service))
        .route("/v1/endpoints/{service}/{id}", axum::routing::put(put_endpoint).delete(delete_endpoint))
        .route_layer(middleware::from_fn_with_state(Arc::clone(&shared), require_token));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .merge(v1)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(shared)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::tests::settings;

    fn check(body: &str) -> Result<EndpointSpec, ApiError> {
        let shared = Shared::new(Arc::new(settings(&[])));
        validate(&shared, "web", "web-1", body.as_bytes())
    }

    fn field_of(body: &str) -> String {
        let e = check(body).expect_err(body);
        e.field.unwrap_or_default()
    }

    #[test]
    fn valid_bodies_become_endpoints() {
        let ep = check(
            r#"{"address":"10.0.0.5","port":8080,"weight":3,"fail_timeout":"30s","tags":["a","a"],
                          "meta":{"v":"1"},"check":{"http":"/health","interval":"2s"}}"#,
        )
        .unwrap();
        assert_eq!(ep.addr(), "10.0.0.5:8080");
        assert_eq!((ep.weight, ep.max_fails, ep.fail_timeout), (3, 2, 30));
        assert_eq!(ep.tags, vec!["a"]);
        assert_eq!(ep.check.unwrap().interval, Duration::from_secs(2));
        // No address: this host.
        assert_eq!(check(r#"{"port":80}"#).unwrap().addr(), "192.0.2.10:80");
    }

    #[test]
    fn every_bad_field_is_named() {
        let cases = [
            (r#"{"address":"10.0.0.5"}"#, "port"),
            (r#"{"port":0}"#, "port"),
            (r#"{"port":70000}"#, "port"),
            (r#"{"port":"80"}"#, "port"),
            (r#"{"port":80,"address":"0.0.0.0"}"#, "address"),
            (r#"{"port":80,"address":"not a host"}"#, "address"),
            (r#"{"port":80,"weight":0}"#, "weight"),
            (r#"{"port":80,"max_fails":-1}"#, "max_fails"),
            (r#"{"port":80,"fail_timeout":"forever"}"#, "fail_timeout"),
            (r#"{"port":80,"tags":["ok","has space"]}"#, "tags[1]"),
            (r#"{"port":80,"meta":{"bad key":"x"}}"#, "meta.bad key"),
            (r#"{"port":80,"check":{"http":"/a","tcp":true}}"#, "check"),
            (r#"{"port":80,"check":{"http":"health"}}"#, "check.http"),
            (r#"{"port":80,"check":{"http":"file:///etc/passwd"}}"#, "check.http"),
            (r#"{"port":80,"check":{"http":"gopher://10.0.0.1/"}}"#, "check.http"),
            (r#"{"port":80,"check":{"http":"http://169.254.169.254/latest/meta-data/"}}"#, "check.http"),
            (r#"{"port":80,"check":{"http":"http://[fd00:ec2::254]:80/"}}"#, "check.http"),
            (r#"{"port":80,"check":{"http":"http://x@127.0.0.1/"}}"#, "check.http"),
            (r#"{"port":80,"check":{"http":"http://0x7f.1:8500/"}}"#, "check.http"),
            (r#"{"port":80,"address":"127.0.0.1"}"#, "address"),
            (r#"{"port":80,"address":"::1"}"#, "address"),
            (r#"{"port":80,"address":"169.254.3.4"}"#, "address"),
            (r#"{"port":80,"address":"169.254.169.254"}"#, "address"),
            (r#"{"port":80,"address":"fd00:ec2::254"}"#, "address"),
            (r#"{"port":80,"check":{"tcp":true,"interval":"1ms"}}"#, "check.interval"),
            (r#"{"port":80,"check":{"ttl":"10s","deregister_critical_service_after":"10s"}}"#, "check.deregister_critical_service_after"),
            (r#"{"port":80,"colour":"blue"}"#, "colour"),
            (r#"[1,2]"#, "body"),
            (r#"{"port":80"#, "body"),
        ];
        for (body, field) in cases {
            let got = field_of(body);
            assert_eq!(got, field, "{body}");
        }
        let shared = Shared::new(Arc::new(settings(&[])));
        assert_eq!(validate(&shared, "bad.name", "x", b"{}").unwrap_err().field.as_deref(), Some("service"));
        assert_eq!(validate(&shared, "web", "a b", b"{}").unwrap_err().field.as_deref(), Some("id"));
        for id in [".", "..", "a/b", "a%2Fb", "a\u{1}b"] {
            assert_eq!(validate(&shared, "web", id, b"{}").unwrap_err().field.as_deref(), Some("id"), "{id:?}");
        }
        // Allowed explicitly.
        let shared = Shared::new(Arc::new(settings(&["--allow-address", "127.0.0.0/8"])));
        let body = br#"{"address":"127.0.0.1","port":80,"check":{"http":"http://127.0.0.1:80/health"}}"#;
        assert!(validate(&shared, "web", "w", body).is_ok());
    }

    #[test]
    fn openapi_documents_every_route_and_field() {
        let doc = include_str!("../openapi.yaml");
        for path in ["  /healthz:", "  /metrics:", "  /v1/endpoints:", "  /v1/endpoints/{service}:", "  /v1/endpoints/{service}/{id}:"] {
            assert!(doc.contains(path), "openapi.yaml lacks {path}");
        }
        let fields = [
            "address",
            "port",
            "weight",
            "max_fails",
            "fail_timeout",
            "backup",
            "down",
            "tags",
            "meta",
            "check",
            "http",
            "tcp",
            "ttl",
            "interval",
            "timeout",
            "deregister_critical_service_after",
            "drain",
            "synced",
            "kv_key",
            "pending_changes",
        ];
        for f in fields {
            assert!(doc.contains(&format!("{f}:")) || doc.contains(&format!("name: {f}")), "openapi.yaml lacks {f}");
        }
    }

    #[test]
    fn token_comparison() {
        assert!(same_token(b"abc", b"abc"));
        assert!(!same_token(b"abc", b"abd"));
        assert!(!same_token(b"abc", b"abcd"));
        assert!(!same_token(b"", b"a"));
    }
}
