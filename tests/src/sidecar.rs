//! The built `upsync-sidecar` as a child process of a test, with its API on a free loopback
//! port, and the Consul queries the sidecar's tests make.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::consul::Consul;
use crate::net::{free_port, http_request};
use crate::proc::Proc;
use crate::wait::wait_until;

/// How to start a sidecar. `node_id` also names its log file.
#[derive(Clone, Debug)]
pub struct SidecarOpts {
    pub node_id: String,
    pub kv_prefix: String,
    /// `--docker-socket` (a path nothing listens on is fine for API-only tests).
    pub socket: PathBuf,
    pub extra_args: Vec<String>,
    pub api_token: Option<String>,
    /// Extra environment variables of the process.
    pub env: Vec<(String, String)>,
}

impl SidecarOpts {
    pub fn new(node_id: &str, socket: &Path) -> SidecarOpts {
        SidecarOpts {
            node_id: node_id.to_string(),
            kv_prefix: "upstreams".to_string(),
            socket: socket.to_path_buf(),
            // Short intervals so that tests see reconciles and polls quickly. The tests'
            // backends listen on loopback: allowed explicitly (refused by default).
            extra_args: vec![
                "--resync".into(),
                "2s".into(),
                "--poll".into(),
                "250ms".into(),
                "--allow-address".into(),
                "127.0.0.0/8".into(),
                "--allow-address".into(),
                "::1/128".into(),
            ],
            api_token: None,
            env: Vec::new(),
        }
    }

    /// Without the harness's `--allow-address` for loopback (the sidecar's defaults).
    pub fn strict_addresses(mut self) -> SidecarOpts {
        let mut out = Vec::new();
        let mut args = std::mem::take(&mut self.extra_args).into_iter();
        while let Some(a) = args.next() {
            if a == "--allow-address" {
                args.next();
            } else {
                out.push(a);
            }
        }
        self.extra_args = out;
        self
    }

    pub fn arg(mut self, a: &str) -> SidecarOpts {
        self.extra_args.push(a.to_string());
        self
    }
}

pub struct Sidecar {
    proc: Option<Proc>,
    pub api_port: u16,
    pub opts: SidecarOpts,
    consul: String,
    dir: PathBuf,
}

impl Sidecar {
    /// Starts the sidecar against the Consul at `consul` (`127.0.0.1:PORT`) and waits for its
    /// `/healthz`.
    pub fn start(dir: &Path, consul: &str, opts: SidecarOpts) -> Sidecar {
        let mut s = Sidecar { proc: None, api_port: free_port(), opts, consul: consul.to_string(), dir: dir.to_path_buf() };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(crate::paths::workspace_bin("upsync-sidecar"));
        cmd.arg("--consul")
            .arg(&self.consul)
            .arg("--docker-socket")
            .arg(&self.opts.socket)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.api_port))
            .arg("--kv-prefix")
            .arg(&self.opts.kv_prefix)
            .arg("--advertise-ip")
            .arg("127.0.0.1")
            .arg("--node-id")
            .arg(&self.opts.node_id)
            .args(&self.opts.extra_args)
            .env("RUST_LOG", "info,upsync_sidecar=debug");
        if !self.opts.extra_args.iter().any(|a| a == "--state-dir") {
            cmd.arg("--state-dir").arg(self.state_dir());
        }
        for (k, v) in &self.opts.env {
            cmd.env(k, v);
        }
        if let Some(t) = &self.opts.api_token {
            let f = self.dir.join(format!("api-token-{}", self.opts.node_id));
            std::fs::write(&f, t).expect("writing the API token file");
            cmd.arg("--api-token-file").arg(f);
        }
        let log = self.dir.join(format!("sidecar-{}.log", self.opts.node_id));
        let mut proc = Proc::spawn("upsync-sidecar", cmd, &log).expect("starting upsync-sidecar");
        let url = format!("http://127.0.0.1:{}/healthz", self.api_port);
        let start = std::time::Instant::now();
        while http_request("GET", &url, &[], None).map(|(s, _)| s != 200).unwrap_or(true) {
            if !proc.is_running() || start.elapsed() > Duration::from_secs(30) {
                panic!("upsync-sidecar did not start (log {}):\n{}", log.display(), proc.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.proc = Some(proc);
    }

    /// Its `--state-dir` (one per node id in the test's directory).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join(format!("state-{}", self.opts.node_id))
    }

    /// Waits up to `timeout` for the process to exit by itself; its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.proc.as_mut()?.wait_exit(timeout)
    }

    /// `http://127.0.0.1:PORT` + path.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.api_port)
    }

    /// One API request with the configured token: (status, body).
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let auth = self.opts.api_token.as_ref().map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        http_request(method, &self.url(path), &headers, body.map(str::as_bytes))
            .unwrap_or_else(|e| panic!("sidecar API {method} {path}: {e}"))
    }

    /// The API's answer as JSON, asserting the status.
    pub fn api_json(&self, method: &str, path: &str, body: Option<&str>, status: u16) -> Value {
        let (s, b) = self.api(method, path, body);
        assert_eq!(s, status, "{method} {path}: {b}");
        serde_json::from_str(&b).unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {b}"))
    }

    pub fn healthz(&self) -> Value {
        self.api_json("GET", "/healthz", None, 200)
    }

    pub fn pid(&self) -> u32 {
        self.proc.as_ref().map(|p| p.pid()).unwrap_or(0)
    }

    pub fn log(&self) -> String {
        self.proc.as_ref().map(|p| p.log()).unwrap_or_default()
    }

    /// SIGKILL: a crash, nothing cleaned up.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Starts it again with the same options and API port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop_with(libc::SIGTERM, Duration::from_secs(5));
        }
    }
}

/// What Consul holds for a service, as the sidecar's tests look at it.
pub struct ConsulView<'a>(pub &'a Consul);

impl ConsulView<'_> {
    /// `PREFIX/SERVICE/` keys → parsed JSON values.
    pub fn kv_entries(&self, folder: &str) -> Vec<(String, Value)> {
        let mut out: Vec<(String, Value)> = self
            .0
            .kv_keys(folder)
            .into_iter()
            .filter_map(|k| {
                let v = self.0.kv_get(&k)?;
                Some((k, serde_json::from_str(&v).unwrap_or(Value::String(v))))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The KV value at `key` as JSON.
    pub fn kv_json(&self, key: &str) -> Option<Value> {
        self.0.kv_get(key).map(|v| serde_json::from_str(&v).unwrap_or(Value::String(v)))
    }

    /// The agent's services (id → JSON).
    pub fn services(&self) -> serde_json::Map<String, Value> {
        let (status, body) = self.0.api("GET", "/v1/agent/services", None).expect("agent services");
        assert_eq!(status, 200, "{body}");
        match serde_json::from_str(&body).expect("services JSON") {
            Value::Object(m) => m,
            _ => panic!("agent services: {body}"),
        }
    }

    /// The ids of the agent's services of `name`.
    pub fn service_ids(&self, name: &str) -> Vec<String> {
        let mut ids: Vec<String> = self.services().into_iter().filter(|(_, v)| v["Service"] == name).map(|(k, _)| k).collect();
        ids.sort();
        ids
    }

    /// The checks of the agent (check id → JSON).
    pub fn checks(&self) -> serde_json::Map<String, Value> {
        let (status, body) = self.0.api("GET", "/v1/agent/checks", None).expect("agent checks");
        assert_eq!(status, 200, "{body}");
        match serde_json::from_str(&body).expect("checks JSON") {
            Value::Object(m) => m,
            _ => panic!("agent checks: {body}"),
        }
    }

    /// Whether the service `id` is in maintenance mode.
    pub fn in_maintenance(&self, id: &str) -> bool {
        self.checks().contains_key(&format!("_service_maintenance:{id}"))
    }
}

/// Waits until `cond` holds, for up to 60 s (the machine is shared: generous on purpose).
pub fn eventually(what: &str, cond: impl FnMut() -> bool) {
    wait_until(what, Duration::from_secs(60), cond)
}
