//! `upstream_show [text|json|prometheus]` in a stream `server {}`: a client that connects gets
//! every stream upstream of the configuration in the server's form (the HTTP `upstream_show`'s
//! renderers over the same views, [`super::views`]), as the answering worker balances it; then
//! nginx closes the connection. And the same views, as JSON, for the HTTP module's
//! `upstream_show` when both modules are loaded ([`ngx_stream_upsync_views_v1`]).
use core::ffi::c_void;
use core::ptr;

use ngx::ffi::*;

use super::views::{collect, leader_pid, StreamViewsFn, ViewsSink};
use super::{module, module_conf, SrvConf};
use crate::show::{self, Format};

/// How long a client may take to read the listing.
const SEND_TIMEOUT_MS: ngx_msec_t = 10_000;

/// What is left to send, kept in the session's context slot of our module.
#[repr(C)]
struct Pending {
    pos: *const u8,
    end: *const u8,
}

/// The server's content handler (`cscf->handler`).
pub unsafe extern "C" fn handler(s: *mut ngx_stream_session_t) {
    // SAFETY: nginx calls the content handler with a valid session on the main thread.
    let rc = super::guard("upstream_show", Err(()), || unsafe { start(s) });
    if rc.is_err() {
        // SAFETY: as above.
        unsafe { ngx_stream_finalize_session(s, NGX_STREAM_INTERNAL_SERVER_ERROR as ngx_uint_t) };
    }
}

/// Renders the listing into the connection's pool and starts writing it.
///
/// # Safety
/// A valid session on the main thread.
unsafe fn start(s: *mut ngx_stream_session_t) -> Result<(), ()> {
    // SAFETY: contract; the session's srv_conf array holds this server block's SrvConf.
    let format = unsafe { module_conf::<SrvConf>((*s).srv_conf, module()) }.and_then(|c| c.show_format).unwrap_or(Format::Text);
    let views = collect(None);
    let body = match format {
        Format::Json | Format::Html => show::render_json(&views, &[], None, std::process::id()).unwrap_or_else(|e| e),
        Format::Prometheus => show::render_prometheus(&views, None, leader_pid(), crate::model::unix_ms()).unwrap_or_else(|e| e),
        Format::Text => show::render_text(&views, None),
    };
    // SAFETY: contract; the buffer and the state live in the connection's pool, which lives as
    // long as the session; the ctx array has a slot for every stream module.
    unsafe {
        let c = (*s).connection;
        let buf = ngx_pnalloc((*c).pool, body.len().max(1)) as *mut u8;
        let pending = ngx_palloc((*c).pool, core::mem::size_of::<Pending>()) as *mut Pending;
        if buf.is_null() || pending.is_null() {
            return Err(());
        }
        ptr::copy_nonoverlapping(body.as_ptr(), buf, body.len());
        pending.write(Pending { pos: buf, end: buf.add(body.len()) });
        *(*s).ctx.add(module().ctx_index) = pending as *mut c_void;
        (*(*c).write).handler = Some(write_handler);
        (*(*c).read).handler = Some(ignore_read);
        write_handler((*c).write);
    }
    Ok(())
}

/// [`super::views::STREAM_VIEWS_SYMBOL`]: the stream upstreams (or the one named `only`) as this
/// worker balances them, as JSON, for the HTTP module's `upstream_show` in the same process,
/// which finds this function by name (`ffi/show.rs`).
///
/// # Safety
/// Called on a worker's main thread (as a content handler is); `only` is null or points to
/// `only_len` bytes; `sink` is a function that may be called with `ctx`.
#[no_mangle]
pub unsafe extern "C" fn ngx_stream_upsync_views_v1(only: *const u8, only_len: usize, sink: ViewsSink, ctx: *mut c_void) -> ngx_int_t {
    let only = if only.is_null() {
        None
    } else {
        // SAFETY: contract: `only_len` readable bytes.
        Some(String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(only, only_len) }).into_owned())
    };
    let json = super::guard("upstream_show for the HTTP module", None, || serde_json::to_vec(&collect(only.as_deref())).ok());
    let Some(json) = json else { return NGX_ERROR as ngx_int_t };
    // SAFETY: contract; the bytes live until the call returns.
    unsafe { sink(ctx, json.as_ptr(), json.len()) };
    NGX_OK as ngx_int_t
}

/// The export has the type the HTTP module calls it with.
const _: StreamViewsFn = ngx_stream_upsync_views_v1;

/// Writes what is left; finalises the session when done, on error or when the client is too
/// slow.
unsafe extern "C" fn write_handler(ev: *mut ngx_event_t) {
    // SAFETY: ev is the write event of a session's client connection (data = connection,
    // connection->data = session) on the main thread; `Pending` was stored by `start`.
    super::guard("upstream_show", (), || unsafe {
        let c = (*ev).data as *mut ngx_connection_t;
        let s = (*c).data as *mut ngx_stream_session_t;
        if (*ev).timedout() != 0 {
            ngx_stream_finalize_session(s, NGX_STREAM_OK as ngx_uint_t);
            return;
        }
        let p = *(*s).ctx.add(module().ctx_index) as *mut Pending;
        while (*p).pos < (*p).end {
            let Some(send) = (*c).send else { break };
            let n = send(c, (*p).pos as *mut u8, (*p).end.offset_from((*p).pos) as usize);
            if n == NGX_AGAIN as isize {
                if ngx_handle_write_event(ev, 0) != NGX_OK as ngx_int_t {
                    break;
                }
                nginx_sys::ngx_add_timer(ev, SEND_TIMEOUT_MS);
                return;
            }
            if n <= 0 {
                break;
            }
            (*p).pos = (*p).pos.add(n as usize);
        }
        if (*ev).timer_set() != 0 {
            nginx_sys::ngx_del_timer(ev);
        }
        ngx_stream_finalize_session(s, NGX_STREAM_OK as ngx_uint_t);
    })
}

/// The client has nothing to say; what it sends is not read.
unsafe extern "C" fn ignore_read(_ev: *mut ngx_event_t) {}
