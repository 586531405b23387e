//! Passes the features nginx was configured with (read by `nginx-sys` from the nginx build
//! tree) to the compiler as `cfg(ngx_feature = "...")`, e.g. to free upstream SSL sessions only
//! when nginx has SSL; and the nginx version as `cfg(nginx1_27_3)` (nginx >= 1.27.3: `resolve`
//! servers in upstreams, the `config` counter of peer lists and of the `hash` module's conf).
///
/// The same sources build two modules: this package (`ngx_http_upsync_module`) and
/// `module/stream` (`ngx_stream_upsync_module`), for which this script sets `cfg(upsync_stream)`:
/// the crate then compiles the stream glue (`src/ffi/stream/`) instead of the HTTP one.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(nginx1_27_3)");
    println!("cargo::rustc-check-cfg=cfg(upsync_stream)");
    if std::env::var("CARGO_PKG_NAME").as_deref() == Ok("ngx_stream_upsync_module") {
        println!("cargo::rustc-cfg=upsync_stream");
    }
    println!("cargo::rerun-if-env-changed=DEP_NGINX_VERSION_NUMBER");
    if let Some(v) = std::env::var("DEP_NGINX_VERSION_NUMBER").ok().and_then(|v| v.trim().parse::<u64>().ok()) {
        if v >= 1_027_003 {
            println!("cargo::rustc-cfg=nginx1_27_3");
        }
    }
    println!("cargo::rerun-if-env-changed=DEP_NGINX_FEATURES_CHECK");
    println!("cargo::rerun-if-env-changed=DEP_NGINX_FEATURES");
    let check = std::env::var("DEP_NGINX_FEATURES_CHECK").unwrap_or_else(|_| "any()".into());
    println!("cargo::rustc-check-cfg=cfg(ngx_feature, values({check}))");
    if let Ok(features) = std::env::var("DEP_NGINX_FEATURES") {
        for f in features.split(',').map(str::trim).filter(|f| !f.is_empty()) {
            println!("cargo::rustc-cfg=ngx_feature=\"{f}\"");
        }
    }
}
