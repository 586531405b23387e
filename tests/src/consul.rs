//! A real Consul agent (the `consul` binary `make deps` installs) on free loopback ports.
//!
//! The helpers here talk to Consul's HTTP API directly with a plain HTTP client, so the tests
//! of `upsync-discovery` are checked against Consul itself, not against our own client.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::net::{free_port, http_request};
use crate::proc::Proc;
use crate::wait::wait_until;

/// Ports one agent listens on (all on 127.0.0.1).
#[derive(Clone, Debug)]
pub struct ConsulPorts {
    pub http: u16,
    pub dns: u16,
    pub serf_lan: u16,
    pub serf_wan: u16,
    pub server: u16,
    pub grpc: u16,
}

impl ConsulPorts {
    /// Free ports (chosen before the agent starts, so that cluster members can name each
    /// other's).
    pub fn fresh() -> ConsulPorts {
        ConsulPorts {
            http: free_port(),
            dns: free_port(),
            serf_lan: free_port(),
            serf_wan: free_port(),
            server: free_port(),
            grpc: free_port(),
        }
    }
}

/// How to start an agent. `Default` is a dev-mode agent with no ACLs and plain HTTP.
#[derive(Clone, Debug, Default)]
pub struct ConsulOptions {
    /// Node name (default: `upsync-test-<http port>`).
    pub node_name: Option<String>,
    /// Extra HCL given with `-hcl` (ACL, TLS, ports blocks...).
    pub extra_hcl: Vec<String>,
    /// Token the harness's own helpers send (the ACL master token when ACLs are on).
    pub token: Option<String>,
    /// Run as a (non-dev) server of a cluster of `bootstrap_expect` servers joining `join`, or
    /// as a client agent of that cluster.
    pub cluster: Option<ClusterMember>,
    /// Address serf and RPC bind to and advertise (`-bind`; default 127.0.0.1): a test host's
    /// address ([`crate::hosts::Host`]) for a cluster across network namespaces.
    pub bind: Option<String>,
    /// `-client` (HTTP and DNS; default 127.0.0.1). `0.0.0.0` inside a test host's namespace
    /// serves its loopback (the harness's helpers) and its address (the other hosts).
    pub client: Option<String>,
}

#[derive(Clone, Debug)]
pub struct ClusterMember {
    /// Servers the cluster waits for before electing a leader (ignored for a client agent).
    pub bootstrap_expect: usize,
    /// serf LAN addresses of other members (`IP:PORT`).
    pub join: Vec<String>,
    /// A server (`-server`); false: a client agent.
    pub server: bool,
}

/// A running Consul agent. Stopped (SIGINT, then SIGKILL) when dropped.
pub struct Consul {
    proc: Option<Proc>,
    pub ports: ConsulPorts,
    dir: PathBuf,
    opts: ConsulOptions,
}

impl Consul {
    /// A dev-mode agent with default options, its log and data under `dir`.
    pub fn start(dir: &Path) -> Consul {
        Consul::start_with(dir, ConsulOptions::default())
    }

    /// An agent with `opts`. Retries with fresh ports if the first ones were taken meanwhile.
    pub fn start_with(dir: &Path, opts: ConsulOptions) -> Consul {
        let mut last_err = String::new();
        for _ in 0..3 {
            let mut c = Consul { proc: None, ports: ConsulPorts::fresh(), dir: dir.to_path_buf(), opts: opts.clone() };
            match c.launch() {
                Ok(()) => return c,
                Err(e) => last_err = e.to_string(),
            }
        }
        panic!("could not start Consul: {last_err}");
    }

    /// Starts an agent with `opts` without waiting for it (a member of a cluster that cannot
    /// elect a leader before its peers run); [`Consul::wait_ready`] waits.
    pub fn spawn_with(dir: &Path, opts: ConsulOptions, ports: ConsulPorts) -> Consul {
        let mut c = Consul { proc: None, ports, dir: dir.to_path_buf(), opts };
        c.spawn().unwrap_or_else(|e| panic!("starting Consul in {}: {e}", dir.display()));
        c
    }

    /// Three (or `n`) servers forming one cluster on loopback, each with its own data dir.
    pub fn cluster(dir: &Path, n: usize) -> Vec<Consul> {
        let ports: Vec<ConsulPorts> = (0..n).map(|_| ConsulPorts::fresh()).collect();
        let serf: Vec<u16> = ports.iter().map(|p| p.serf_lan).collect();
        let mut members: Vec<Consul> = ports
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let opts = ConsulOptions {
                    node_name: Some(format!("upsync-server-{i}")),
                    cluster: Some(ClusterMember {
                        bootstrap_expect: n,
                        join: serf.iter().filter(|&&s| s != p.serf_lan).map(|s| format!("127.0.0.1:{s}")).collect(),
                        server: true,
                    }),
                    ..Default::default()
                };
                Consul { proc: None, ports: p, dir: dir.join(format!("consul-{i}")), opts }
            })
            .collect();
        for m in members.iter_mut() {
            std::fs::create_dir_all(&m.dir).expect("cluster member dir");
            m.spawn().unwrap_or_else(|e| panic!("starting cluster member: {e}"));
        }
        for m in members.iter() {
            m.wait_ready(Duration::from_secs(60)).unwrap_or_else(|e| panic!("cluster member not ready: {e}"));
        }
        members
    }

    fn node_name(&self) -> String {
        self.opts.node_name.clone().unwrap_or_else(|| format!("upsync-test-{}", self.ports.http))
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let p = &self.ports;
        let mut cmd = Command::new(crate::paths::consul_bin());
        cmd.arg("agent");
        match &self.opts.cluster {
            None => {
                cmd.arg("-dev");
            }
            Some(m) => {
                if m.server {
                    cmd.arg("-server").arg(format!("-bootstrap-expect={}", m.bootstrap_expect));
                }
                cmd.arg(format!("-data-dir={}", self.dir.join("data").display()));
                for j in &m.join {
                    cmd.arg(format!("-retry-join={j}"));
                }
            }
        }
        cmd.args(["-bind", self.opts.bind.as_deref().unwrap_or("127.0.0.1")])
            .args(["-client", self.opts.client.as_deref().unwrap_or("127.0.0.1")])
            .args(["-log-level", "info"])
            .arg(format!("-node={}", self.node_name()))
            .arg(format!("-http-port={}", p.http))
            .arg(format!("-dns-port={}", p.dns))
            .arg(format!("-serf-lan-port={}", p.serf_lan))
            .arg(format!("-serf-wan-port={}", p.serf_wan))
            .arg(format!("-server-port={}", p.server))
            .arg(format!("-grpc-port={}", p.grpc));
        for h in &self.opts.extra_hcl {
            cmd.arg("-hcl").arg(h);
        }
        std::fs::create_dir_all(&self.dir)?;
        let log = self.dir.join(format!("consul-{}.log", p.http));
        self.proc = Some(Proc::spawn("consul", cmd, &log)?);
        Ok(())
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        self.spawn()?;
        self.wait_ready(Duration::from_secs(30))
    }

    /// Waits until the agent has a leader and its own node is in the catalog (so KV writes and
    /// service registrations succeed).
    pub fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let start = std::time::Instant::now();
        let node = self.node_name();
        loop {
            let leader = self.api("GET", "/v1/status/leader", None).map(|(s, b)| s == 200 && b.len() > 4).unwrap_or(false);
            let registered = leader
                && self.api("GET", &format!("/v1/catalog/node/{node}"), None).map(|(s, b)| s == 200 && b.trim() != "null").unwrap_or(false);
            if registered {
                return Ok(());
            }
            if start.elapsed() > timeout {
                let log = self.proc.as_ref().map(|p| p.log()).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                anyhow::bail!(
                    "Consul on 127.0.0.1:{} not ready after {timeout:?}; last log lines:\n{}",
                    self.ports.http,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            if let Some(p) = self.proc.as_ref() {
                if p.log().contains("address already in use") {
                    anyhow::bail!("a Consul port was taken: {}", p.log_path().display());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `127.0.0.1:PORT` of the HTTP API.
    pub fn http_addr(&self) -> String {
        format!("127.0.0.1:{}", self.ports.http)
    }

    /// `BIND:PORT` of the HTTP API: how other hosts reach an agent started with
    /// [`ConsulOptions::bind`] and a `client` that covers it.
    pub fn bind_http_addr(&self) -> String {
        format!("{}:{}", self.opts.bind.as_deref().unwrap_or("127.0.0.1"), self.ports.http)
    }

    /// `BIND:PORT` of serf LAN (what other agents join).
    pub fn serf_addr(&self) -> String {
        format!("{}:{}", self.opts.bind.as_deref().unwrap_or("127.0.0.1"), self.ports.serf_lan)
    }

    /// `http://127.0.0.1:PORT` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.ports.http)
    }

    pub fn pid(&self) -> u32 {
        self.proc.as_ref().map(|p| p.pid()).unwrap_or(0)
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().map(|p| p.is_running()).unwrap_or(false)
    }

    /// The agent's combined output so far.
    pub fn log(&self) -> String {
        self.proc.as_ref().map(|p| p.log()).unwrap_or_default()
    }

    /// Graceful stop (SIGINT: leave the cluster), SIGKILL after 10 s.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop_with(libc::SIGINT, Duration::from_secs(10));
        }
    }

    /// SIGKILL, no leave (a crash).
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Starts the agent again on the same ports (a dev agent comes back empty, with a new index).
    pub fn restart(&mut self) {
        self.stop();
        let mut last = String::new();
        for _ in 0..50 {
            match self.spawn().and_then(|_| self.wait_ready(Duration::from_secs(30))) {
                Ok(()) => return,
                Err(e) => {
                    last = e.to_string();
                    self.kill();
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        panic!("restarting Consul on its old ports failed: {last}");
    }

    /// Starts a stopped member of a cluster again (same ports, same data dir) without waiting
    /// for it to be ready.
    pub fn start_again(&mut self) {
        assert!(self.proc.is_none(), "start_again on a running agent");
        self.spawn().unwrap_or_else(|e| panic!("starting Consul again: {e}"));
    }

    /// Starts a stopped member again and waits until it is ready. While it was down, one of its
    /// ports may have been handed out as the local port of some outgoing connection: then it is
    /// tried again a little later (up to 10 times).
    pub fn rejoin(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let mut last = None;
        for _ in 0..10 {
            self.start_again();
            match self.wait_ready(timeout) {
                Ok(()) => return Ok(()),
                Err(e) if e.to_string().contains("port was taken") => {
                    self.stop();
                    last = Some(e);
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("Consul did not rejoin")))
    }

    /// One request to the agent's HTTP API with the harness token; `(status, body)`.
    pub fn api(&self, method: &str, path: &str, body: Option<&[u8]>) -> anyhow::Result<(u16, String)> {
        let mut headers = Vec::new();
        if let Some(t) = &self.opts.token {
            headers.push(("X-Consul-Token", t.as_str()));
        }
        http_request(method, &self.url(path), &headers, body)
    }

    fn api_ok(&self, method: &str, path: &str, body: Option<&[u8]>) -> String {
        let (status, text) = self.api(method, path, body).unwrap_or_else(|e| panic!("Consul {method} {path}: {e}"));
        assert!((200..300).contains(&status), "Consul {method} {path}: HTTP {status}: {text}");
        text
    }

    /// `PUT /v1/kv/KEY` with `value` as the raw body.
    pub fn kv_put(&self, key: &str, value: &str) {
        let r = self.api_ok("PUT", &format!("/v1/kv/{key}"), Some(value.as_bytes()));
        assert_eq!(r.trim(), "true", "KV put of {key} refused: {r}");
    }

    /// Writes `pairs` (key, value) with `/v1/txn`, 64 per transaction (Consul's limit): the
    /// keys of one transaction change at one index, as one answer to a watch.
    pub fn kv_put_many(&self, pairs: &[(String, String)]) {
        use base64::Engine;
        for chunk in pairs.chunks(64) {
            let ops: Vec<serde_json::Value> = chunk
                .iter()
                .map(|(k, v)| serde_json::json!({ "KV": { "Verb": "set", "Key": k, "Value": base64::engine::general_purpose::STANDARD.encode(v) } }))
                .collect();
            self.api_ok("PUT", "/v1/txn", Some(serde_json::Value::from(ops).to_string().as_bytes()));
        }
    }

    /// The raw value of KEY, `None` when it does not exist.
    pub fn kv_get(&self, key: &str) -> Option<String> {
        let (status, body) = self.api("GET", &format!("/v1/kv/{key}?raw"), None).expect("KV get");
        match status {
            200 => Some(body),
            404 => None,
            s => panic!("Consul GET /v1/kv/{key}: HTTP {s}: {body}"),
        }
    }

    /// Keys under PREFIX (recursive), empty when none.
    pub fn kv_keys(&self, prefix: &str) -> Vec<String> {
        let (status, body) = self.api("GET", &format!("/v1/kv/{prefix}?keys"), None).expect("KV keys");
        match status {
            200 => serde_json::from_str(&body).expect("keys JSON"),
            404 => Vec::new(),
            s => panic!("Consul GET /v1/kv/{prefix}?keys: HTTP {s}: {body}"),
        }
    }

    /// `DELETE /v1/kv/KEY`.
    pub fn kv_delete(&self, key: &str) {
        self.api_ok("DELETE", &format!("/v1/kv/{key}"), None);
    }

    /// `DELETE /v1/kv/PREFIX?recurse`.
    pub fn kv_delete_tree(&self, prefix: &str) {
        self.api_ok("DELETE", &format!("/v1/kv/{prefix}?recurse"), None);
    }

    /// `PUT /v1/agent/service/register` with `service` (Consul's JSON).
    pub fn register_service(&self, service: &serde_json::Value) {
        self.api_ok("PUT", "/v1/agent/service/register", Some(service.to_string().as_bytes()));
    }

    /// `PUT /v1/agent/service/deregister/ID`.
    pub fn deregister_service(&self, id: &str) {
        self.api_ok("PUT", &format!("/v1/agent/service/deregister/{id}"), None);
    }

    /// Sets a TTL check's state: `pass`, `warn` or `fail`.
    pub fn ttl_check(&self, check_id: &str, state: &str) {
        self.api_ok("PUT", &format!("/v1/agent/check/{state}/{check_id}"), None);
    }

    /// The current `X-Consul-Index` of the KV store under `prefix` (0 when empty).
    pub fn kv_index(&self, prefix: &str) -> u64 {
        self.index(&format!("/v1/kv/{prefix}?recurse"))
    }

    /// The current `X-Consul-Index` of a read (`/v1/catalog/services`, ...; 0 when absent).
    pub fn index(&self, path: &str) -> u64 {
        let url = self.url(path);
        let mut req = ureq::get(&url);
        if let Some(t) = &self.opts.token {
            req = req.set("X-Consul-Token", t);
        }
        let resp = match req.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("GET {url}: {e}"),
        };
        resp.header("X-Consul-Index").and_then(|v| v.parse().ok()).unwrap_or(0)
    }

    /// Waits until the agent answers again after a restart or a cluster change.
    pub fn wait_leader(&self) {
        wait_until("a Consul leader", Duration::from_secs(60), || {
            self.api("GET", "/v1/status/leader", None).map(|(s, b)| s == 200 && b.len() > 4).unwrap_or(false)
        });
    }
}

impl Drop for Consul {
    fn drop(&mut self) {
        self.stop();
    }
}

/// ACL master token of [`ConsulOptions::with_acl`] agents.
pub const ACL_MASTER_TOKEN: &str = "6f1d7c0e-0b6a-4d6f-9a53-7f0f6e6c1a11";

impl ConsulOptions {
    /// ACLs enabled with `default_policy = "deny"` and `enable_key_list_policy` (so a KV list
    /// without `list` permission is refused with 403 instead of silently filtered). The
    /// harness's helpers use the master token, which is also the agent's own token.
    pub fn with_acl() -> ConsulOptions {
        ConsulOptions {
            extra_hcl: vec![format!(
                r#"acl {{ enabled = true default_policy = "deny" enable_key_list_policy = true down_policy = "extend-cache" tokens {{ master = "{ACL_MASTER_TOKEN}" agent = "{ACL_MASTER_TOKEN}" }} }}"#
            )],
            token: Some(ACL_MASTER_TOKEN.to_string()),
            ..Default::default()
        }
    }

    /// Also serve HTTPS on `https_port` with `tls`'s server certificate; clients must present
    /// a certificate signed by the CA when `require_client_cert`. Plain HTTP stays on for the
    /// harness's own helpers.
    pub fn with_https(mut self, tls: &ConsulTls, https_port: u16, require_client_cert: bool) -> ConsulOptions {
        self.extra_hcl.push(format!(
            r#"ports {{ https = {https_port} }} ca_file = "{}" cert_file = "{}" key_file = "{}" verify_incoming_https = {require_client_cert}"#,
            tls.ca_file.display(),
            tls.server_cert.display(),
            tls.server_key.display()
        ));
        self
    }
}

impl Consul {
    /// Creates an ACL policy with `rules` (HCL) and a token holding it; returns its SecretID.
    /// Needs an agent started with [`ConsulOptions::with_acl`].
    pub fn create_token(&self, name: &str, rules: &str) -> String {
        let policy = serde_json::json!({ "Name": name, "Rules": rules }).to_string();
        self.api_ok("PUT", "/v1/acl/policy", Some(policy.as_bytes()));
        let token = serde_json::json!({ "Description": name, "Policies": [{ "Name": name }] }).to_string();
        let out = self.api_ok("PUT", "/v1/acl/token", Some(token.as_bytes()));
        let v: serde_json::Value = serde_json::from_str(&out).expect("ACL token JSON");
        v["SecretID"].as_str().expect("SecretID in the ACL token answer").to_string()
    }
}

/// A CA, a server certificate and a client certificate made by Consul's own tools
/// (`consul tls ca create`, `consul tls cert create -server` / `-client`), in one directory.
/// The server certificate is valid for `server.dc1.consul`, `localhost` and `127.0.0.1`.
#[derive(Clone, Debug)]
pub struct ConsulTls {
    pub ca_file: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl ConsulTls {
    pub fn create(dir: &Path) -> ConsulTls {
        std::fs::create_dir_all(dir).expect("TLS dir");
        let run = |args: &[&str]| {
            let out = Command::new(crate::paths::consul_bin())
                .args(args)
                .current_dir(dir)
                .output()
                .unwrap_or_else(|e| panic!("consul {args:?}: {e}"));
            assert!(out.status.success(), "consul {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        };
        run(&["tls", "ca", "create"]);
        run(&["tls", "cert", "create", "-server", "-dc", "dc1"]);
        run(&["tls", "cert", "create", "-client", "-dc", "dc1"]);
        ConsulTls {
            ca_file: dir.join("consul-agent-ca.pem"),
            server_cert: dir.join("dc1-server-consul-0.pem"),
            server_key: dir.join("dc1-server-consul-0-key.pem"),
            client_cert: dir.join("dc1-client-consul-0.pem"),
            client_key: dir.join("dc1-client-consul-0-key.pem"),
        }
    }
}
