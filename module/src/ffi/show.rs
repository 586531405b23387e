//! The `upstream_show` and `upsync_metrics` content handlers.
use core::ptr;

use ngx::ffi::*;
use ngx::http::Request;

use super::{cycle_main_conf, cycle_upstreams, peers, shm, srv_conf_of};
use crate::show::{self, Format, ServerJson, ServerView, SyncView, UpstreamView};

pub unsafe extern "C" fn handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx calls content handlers with a valid request on the main thread.
    super::guard("upstream_show", NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t, || unsafe { handle(r, None) })
}

/// `upsync_metrics`: `upstream_show` that always answers with the Prometheus metrics.
pub unsafe extern "C" fn metrics_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx calls content handlers with a valid request on the main thread.
    super::guard("upsync_metrics", NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t, || unsafe { handle(r, Some(Format::Prometheus)) })
}

/// # Safety
/// A valid request on the main thread.
unsafe fn handle(r: *mut ngx_http_request_t, forced: Option<Format>) -> ngx_int_t {
    // SAFETY: nginx calls content handlers with a valid request on the main thread.
    unsafe {
        if (*r).method & (NGX_HTTP_GET | NGX_HTTP_HEAD) as ngx_uint_t == 0 {
            return NGX_HTTP_NOT_ALLOWED as ngx_int_t;
        }
        let rc = ngx_http_discard_request_body(r);
        if rc != NGX_OK as ngx_int_t {
            return rc;
        }
        let args = String::from_utf8_lossy((*r).args.as_bytes()).into_owned();
        let request = Request::from_ngx_http_request(r);
        let accept = request
            .headers_in_iterator()
            .find(|(k, _)| k.as_bytes().eq_ignore_ascii_case(b"accept"))
            .map(|(_, v)| v.to_string_lossy().into_owned());
        let mut want = show::parse_request(&args, accept.as_deref());
        if let Some(f) = forced {
            want.format = f;
        }
        let selected = want.upstream.as_deref();
        let views = collect(selected);
        let pid = std::process::id();
        let (status, body, format) = match want.format {
            Format::Text => (200, show::render_text(&views, selected), Format::Text),
            Format::Json => match show::render_json(&views, selected, pid) {
                Ok(b) => (200, b, Format::Json),
                Err(b) => (404, b, Format::Json),
            },
            Format::Html => match show::render_json(&views, selected, pid) {
                Ok(b) => (200, show::render_html(&b), Format::Html),
                Err(b) => (404, b, Format::Json),
            },
            Format::Prometheus => match show::render_prometheus(&views, selected, leader_pid(), crate::model::unix_ms()) {
                Ok(b) => (200, b, Format::Prometheus),
                Err(b) => (404, b, Format::Text),
            },
        };
        send(r, status, format.content_type(), body.into_bytes())
    }
}

/// The PID holding the leader lease (0: none, or no synced upstream).
fn leader_pid() -> i64 {
    // SAFETY: content handlers run on the main thread; the header, when set, is the running
    // cycle's zone header.
    unsafe {
        match cycle_main_conf() {
            Some(main) if !main.header.is_null() => shm::leader_pid(main),
            _ => 0,
        }
    }
}

/// # Safety
/// Valid request on the main thread.
unsafe fn send(r: *mut ngx_http_request_t, status: ngx_uint_t, content_type: &'static str, body: Vec<u8>) -> ngx_int_t {
    // SAFETY: contract; the body is copied into a buffer from the request's pool, the content
    // type points to static bytes.
    unsafe {
        let ct = content_type.as_bytes();
        (*r).headers_out.status = status;
        (*r).headers_out.content_type = ngx_str_t { len: ct.len(), data: ct.as_ptr() as *mut u8 };
        // The length of the media type alone (nginx's charset handling looks at it).
        (*r).headers_out.content_type_len = ct.iter().position(|&b| b == b';').unwrap_or(ct.len());
        (*r).headers_out.content_length_n = body.len() as off_t;
        if (*r).method == NGX_HTTP_HEAD as ngx_uint_t || body.is_empty() {
            (*r).set_header_only(((*r).method == NGX_HTTP_HEAD as ngx_uint_t) as u32);
            let rc = ngx_http_send_header(r);
            if body.is_empty() || (*r).header_only() != 0 {
                return rc;
            }
        }
        let b = ngx_create_temp_buf((*r).pool, body.len());
        if b.is_null() {
            return NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
        }
        ptr::copy_nonoverlapping(body.as_ptr(), (*b).last, body.len());
        (*b).last = (*b).last.add(body.len());
        (*b).set_last_buf(((*r).main == r) as u32);
        (*b).set_last_in_chain(1);
        let mut out = ngx_chain_t { buf: b, next: ptr::null_mut() };
        let rc = ngx_http_send_header(r);
        if rc == NGX_ERROR as ngx_int_t || rc > NGX_OK as ngx_int_t || (*r).header_only() != 0 {
            return rc;
        }
        ngx_http_output_filter(r, &mut out)
    }
}

/// Every upstream of the running configuration (or only the one named `only`), as this worker
/// balances it. With `only`, the others are skipped by name before any view is built: one
/// upstream's view costs the same with 10 upstreams or 10,000.
fn collect(only: Option<&str>) -> Vec<UpstreamView> {
    let mut views = Vec::new();
    // SAFETY: main thread; the cycle's upstream confs and their peer lists are valid.
    unsafe {
        for &us in cycle_upstreams() {
            if only.is_some_and(|n| n.as_bytes() != (*us).host.as_bytes()) {
                continue;
            }
            let name = String::from_utf8_lossy((*us).host.as_bytes()).into_owned();
            let synced = srv_conf_of(us).filter(|s| s.sync.upsync.is_some() && s.slot.is_some());
            let Some(srv) = synced else {
                views.push(UpstreamView { name, servers: nginx_peers((*us).peer.data as *const _), sync: None });
                continue;
            };
            peers::sync(srv);
            let servers = match &srv.current {
                Some(g) => g
                    .servers
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        let (fails, active) = g.peer_state(i);
                        ServerView { server: ServerJson::from(s), fails, active }
                    })
                    .collect(),
                None => nginx_peers((*us).peer.data as *const _),
            };
            let pool = srv.shpool.map(|p| p.as_ptr()).unwrap_or(ptr::null_mut());
            let sync = srv.slot.map(|slot| {
                let (version, meta) = shm::read_meta(pool, slot.as_ptr());
                SyncView::new(srv.source.clone(), version, meta)
            });
            views.push(UpstreamView { name, servers, sync });
        }
    }
    views
}

/// The servers of an nginx round-robin list (primary, then backup).
///
/// # Safety
/// `peers` null or a valid rr peers list.
unsafe fn nginx_peers(peers: *const ngx_http_upstream_rr_peers_t) -> Vec<ServerView> {
    let mut out = Vec::new();
    let mut list = peers;
    let mut backup = false;
    // SAFETY: contract; walking the lists through `peer`/`next`, under the list's lock when it
    // is in a shared zone.
    unsafe {
        let _lock = peers::PeersReadLock::new(peers);
        while !list.is_null() {
            let mut p = (*list).peer;
            while !p.is_null() {
                let server = String::from_utf8_lossy((*p).name.as_bytes()).into_owned();
                out.push(ServerView {
                    server: ServerJson {
                        server,
                        weight: (*p).weight as u32,
                        max_fails: (*p).max_fails as u32,
                        fail_timeout: (*p).fail_timeout as u32,
                        down: (*p).down != 0,
                        backup,
                    },
                    fails: (*p).fails as u64,
                    active: (*p).conns as u64,
                });
                p = (*p).next;
            }
            list = (*list).next;
            backup = true;
        }
    }
    out
}
