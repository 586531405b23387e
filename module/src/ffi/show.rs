//! The `upstream_show` and `upsync_metrics` content handlers.
use core::ptr;

use ngx::ffi::*;
use ngx::http::Request;

use super::views::{collect, leader_pid};
use crate::show::{self, Format};

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
