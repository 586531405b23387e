//! Passes the features nginx was configured with (read by `nginx-sys` from the nginx build
//! tree) to the compiler as `cfg(ngx_feature = "...")`, e.g. to free upstream SSL sessions only
//! when nginx has SSL.
fn main() {
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
