//! The `upstream_show` and `upsync_metrics` content handlers. The JSON and the status page also
//! list the stream module's upstreams when it is loaded in the same nginx ([`stream_views`]).
use core::ffi::c_void;
use core::ptr;

use ngx::ffi::*;
use ngx::http::Request;

use super::find_module;
use super::views::{collect, leader_pid, StreamViewsFn, STREAM_VIEWS_SYMBOL};
use crate::show::{self, Format, UpstreamView};

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
        let stream = if show::wants_stream(want.format, &views, selected) { stream_views(selected) } else { Vec::new() };
        let pid = std::process::id();
        let (status, body, format) = match want.format {
            Format::Text => (200, show::render_text(&views, selected), Format::Text),
            Format::Json => match show::render_json(&views, &stream, selected, pid) {
                Ok(b) => (200, b, Format::Json),
                Err(b) => (404, b, Format::Json),
            },
            Format::Html => match show::render_json(&views, &stream, selected, pid) {
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

/// The stream upstreams (or the one named `only`) as this worker balances them, when the running
/// configuration loads the stream module (`ngx_stream_upsync_module.so`); none otherwise, or
/// when that module is a build without the export.
fn stream_views(only: Option<&str>) -> Vec<UpstreamView> {
    // SAFETY: content handlers run on the main thread.
    let Some(export) = (unsafe { stream_export() }) else { return Vec::new() };
    let mut json: Vec<u8> = Vec::new();
    let (p, n) = only.map_or((ptr::null(), 0), |s| (s.as_ptr(), s.len()));
    let ctx = &mut json as *mut Vec<u8> as *mut c_void;
    // SAFETY: the stream module's export, on the worker's main thread as its contract asks; `only`
    // is `n` bytes, `append` takes `ctx`, a Vec<u8> that outlives the call.
    let rc = unsafe { export(p, n, append, ctx) };
    if rc != NGX_OK as ngx_int_t {
        tracing::warn!("upstream_show: the stream module could not list its upstreams (see the error log above); listing HTTP only");
        return Vec::new();
    }
    serde_json::from_slice(&json).unwrap_or_else(|e| {
        tracing::warn!(
            "upstream_show: cannot read the stream module's upstreams ({e}); listing HTTP only (are both modules from the same build?)"
        );
        Vec::new()
    })
}

/// The sink [`stream_views`] hands the stream module: appends the JSON to the `Vec<u8>` at `ctx`.
unsafe extern "C" fn append(ctx: *mut c_void, json: *const u8, len: usize) {
    // SAFETY: `ctx` is stream_views' Vec<u8>, not otherwise borrowed during the call; the export's
    // contract: `json` holds `len` bytes during the call.
    unsafe { (*(ctx as *mut Vec<u8>)).extend_from_slice(std::slice::from_raw_parts(json, len)) };
}

/// The stream module's [`STREAM_VIEWS_SYMBOL`], if the running cycle loads
/// `ngx_stream_upsync_module`: looked up in the very shared object whose module table is in the
/// cycle (not by a global name search, which could find a copy of another configuration).
///
/// # Safety
/// Main thread (reads `ngx_cycle`).
unsafe fn stream_export() -> Option<StreamViewsFn> {
    // SAFETY: contract: ngx_cycle is the running cycle (or null before the first).
    let cycle = unsafe { ngx_cycle } as *mut ngx_cycle_t;
    // SAFETY: a non-null running cycle has its NULL-terminated module list.
    if cycle.is_null() || unsafe { (*cycle).modules }.is_null() {
        return None;
    }
    // SAFETY: as above.
    let module = unsafe { find_module(cycle, "ngx_stream_upsync_module") }?;
    let addr = module as *const ngx_module_t as *const c_void;
    // SAFETY: an all-zero Dl_info is valid (null pointers), filled by dladdr.
    let mut info: libc::Dl_info = unsafe { core::mem::zeroed() };
    // SAFETY: dladdr only looks up which loaded object maps `addr`.
    if unsafe { libc::dladdr(addr, &mut info) } == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dli_fname is the NUL-terminated path of a loaded object; RTLD_NOLOAD loads nothing,
    // it returns that object's handle (with a reference, dropped below).
    let handle = unsafe { libc::dlopen(info.dli_fname, libc::RTLD_NOW | libc::RTLD_NOLOAD) };
    if handle.is_null() {
        return None;
    }
    // SAFETY: a live handle and a NUL-terminated name.
    let sym = unsafe { libc::dlsym(handle, STREAM_VIEWS_SYMBOL.as_ptr()) };
    // SAFETY: drops dlopen's reference; nginx's own (load_module) keeps the object mapped while
    // the cycle runs, so `sym` stays valid.
    unsafe { libc::dlclose(handle) };
    if sym.is_null() {
        return None;
    }
    // SAFETY: the stream module exports a function of this type under this name (checked at
    // compile time in ffi/stream/show.rs).
    Some(unsafe { core::mem::transmute::<*mut c_void, StreamViewsFn>(sym) })
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
