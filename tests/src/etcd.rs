//! A real etcd 3.5 (the binary `make deps` installs, see [`crate::paths::etcd_bin`]) on free
//! loopback ports: one member or a cluster, each with its data and log in the test's directory,
//! v2 API enabled (`--enable-v2`) so both of the module's etcd paths can be tested; optionally
//! HTTPS with client certificates (made by Consul's tools, [`ConsulTls`]).
//!
//! The helpers write through etcd's own HTTP APIs (v3 JSON gateway, v2 keys) with a plain HTTP
//! client, not through `upsync-discovery`. [`Gate`] is a transparent TCP relay in front of a
//! member that a test can cut (every connection closed, new ones refused) and open again, to
//! make the module's watch miss what happens meanwhile.
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;

use crate::consul::ConsulTls;
use crate::net::{free_port, http_request};
use crate::proc::Proc;

/// One etcd member. Stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Etcd {
    proc: Option<Proc>,
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    /// The HTTPS client port of [`Etcd::start_tls`] (the helpers use the plain one).
    pub https_port: Option<u16>,
    dir: PathBuf,
}

/// How a single member is started.
#[derive(Clone, Default)]
struct Options {
    no_v2: bool,
    tls: Option<ConsulTls>,
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s.as_bytes())
}

/// `application/x-www-form-urlencoded` value.
fn form(s: &str) -> String {
    s.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

impl Etcd {
    /// A single-member cluster under `dir`. Retries with fresh ports if one was taken meanwhile.
    pub fn start(dir: &Path) -> Etcd {
        Etcd::start_with(dir, Options::default())
    }

    /// A single member without `--enable-v2` (etcd 3.4+'s default).
    pub fn start_without_v2(dir: &Path) -> Etcd {
        Etcd::start_with(dir, Options { no_v2: true, ..Options::default() })
    }

    /// A single member that also serves HTTPS on [`Etcd::https_port`] with `tls`'s server
    /// certificate and requires client certificates signed by its CA there.
    pub fn start_tls(dir: &Path, tls: &ConsulTls) -> Etcd {
        Etcd::start_with(dir, Options { tls: Some(tls.clone()), ..Options::default() })
    }

    fn start_with(dir: &Path, opts: Options) -> Etcd {
        let mut last = String::new();
        for _ in 0..3 {
            let (client_port, peer_port) = (free_port(), free_port());
            let https_port = opts.tls.as_ref().map(|_| free_port());
            let name = format!("etcd-{client_port}");
            let cluster = format!("{name}=http://127.0.0.1:{peer_port}");
            let mut e = Etcd { proc: None, name, client_port, peer_port, https_port, dir: dir.join(format!("etcd-{client_port}")) };
            match e.spawn(&cluster, &opts).and_then(|()| e.wait_ready(Duration::from_secs(30))) {
                Ok(()) => return e,
                Err(err) => last = err.to_string(),
            }
        }
        panic!("could not start etcd: {last}");
    }

    /// `n` members forming one cluster on loopback.
    pub fn cluster(dir: &Path, n: usize) -> Vec<Etcd> {
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let cluster =
            ports.iter().enumerate().map(|(i, (_, peer))| format!("member{i}=http://127.0.0.1:{peer}")).collect::<Vec<_>>().join(",");
        let mut members: Vec<Etcd> = ports
            .iter()
            .enumerate()
            .map(|(i, &(client_port, peer_port))| Etcd {
                proc: None,
                name: format!("member{i}"),
                client_port,
                peer_port,
                https_port: None,
                dir: dir.join(format!("etcd-member{i}")),
            })
            .collect();
        for m in members.iter_mut() {
            m.spawn(&cluster, &Options::default()).unwrap_or_else(|e| panic!("starting etcd {}: {e}", m.name));
        }
        for m in &members {
            m.wait_ready(Duration::from_secs(60)).unwrap_or_else(|e| panic!("etcd {} not ready: {e}", m.name));
        }
        members
    }

    fn spawn(&mut self, cluster: &str, opts: &Options) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let listen = match self.https_port {
            Some(p) => format!("{client},https://127.0.0.1:{p}"),
            None => client.clone(),
        };
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(crate::paths::etcd_bin());
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &listen, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", cluster, "--initial-cluster-state", "new"])
            .arg("--initial-cluster-token")
            .arg(format!("upsync-test-{}", std::process::id()))
            .args(["--log-level", "info"]);
        if !opts.no_v2 {
            cmd.arg("--enable-v2");
        }
        if let Some(t) = &opts.tls {
            cmd.arg("--cert-file").arg(&t.server_cert).arg("--key-file").arg(&t.server_key);
            cmd.arg("--trusted-ca-file").arg(&t.ca_file).arg("--client-cert-auth");
        }
        let log = self.dir.join("etcd.log");
        self.proc = Some(Proc::spawn("etcd", cmd, &log)?);
        Ok(())
    }

    /// Waits until the member reports itself healthy (it has a leader).
    pub fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let start = std::time::Instant::now();
        loop {
            if let Ok((200, body)) = http_request("GET", &self.url("/health"), &[], None) {
                if body.contains("\"health\":\"true\"") {
                    return Ok(());
                }
            }
            let log = self.proc.as_ref().map(|p| p.log()).unwrap_or_default();
            if log.contains("address already in use") {
                anyhow::bail!("an etcd port was taken ({})", self.dir.display());
            }
            if start.elapsed() > timeout {
                let tail: Vec<&str> = log.lines().rev().take(10).collect();
                anyhow::bail!("etcd on 127.0.0.1:{} not healthy after {timeout:?}:\n{}", self.client_port, tail.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `127.0.0.1:PORT` of the client API.
    pub fn client_addr(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.client_port)
    }

    pub fn pid(&self) -> u32 {
        self.proc.as_ref().map(|p| p.pid()).unwrap_or(0)
    }

    /// SIGKILL, no grace (a member that dies).
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// The member's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }

    /// One write or read through the member; answers of a cluster electing a new leader
    /// (HTTP 5xx: "request timed out", "no leader") are retried for up to 30 s. Returns the
    /// status, the body, and whether it was retried.
    fn call(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String, bool) {
        let start = std::time::Instant::now();
        let mut retried = false;
        loop {
            let (status, text) = http_request(method, &self.url(path), headers, Some(body)).unwrap_or_else(|e| panic!("etcd {path}: {e}"));
            if status < 500 || start.elapsed() > Duration::from_secs(30) {
                return (status, text, retried);
            }
            retried = true;
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn v3(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
        let (status, text, _) = self.call("POST", path, &[("Content-Type", "application/json")], body.to_string().as_bytes());
        assert_eq!(status, 200, "etcd {path}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("etcd {path}: {e}: {text}"))
    }

    /// v3 `put`; returns the revision it made.
    pub fn put(&self, key: &str, value: &str) -> u64 {
        let r = self.v3("/v3/kv/put", serde_json::json!({ "key": b64(key), "value": b64(value) }));
        revision(&r)
    }

    /// v3 `delete` of one key.
    pub fn delete(&self, key: &str) -> u64 {
        let r = self.v3("/v3/kv/deleterange", serde_json::json!({ "key": b64(key) }));
        revision(&r)
    }

    /// The store's current revision.
    pub fn revision(&self) -> u64 {
        let r = self.v3("/v3/kv/range", serde_json::json!({ "key": b64("\u{0}"), "count_only": true }));
        revision(&r)
    }

    /// Compacts the history up to `revision` (older revisions can no longer be watched from).
    pub fn compact(&self, revision: u64) {
        self.v3("/v3/kv/compaction", serde_json::json!({ "revision": revision.to_string(), "physical": true }));
    }

    /// v2 `PUT /v2/keys/KEY` with `value`.
    pub fn v2_put(&self, key: &str, value: &str) {
        let body = format!("value={}", form(value));
        let path = format!("/v2/keys/{}", key.trim_start_matches('/'));
        let (status, text, _) = self.call("PUT", &path, &[("Content-Type", "application/x-www-form-urlencoded")], body.as_bytes());
        assert!(status == 200 || status == 201, "etcd v2 put {key}: HTTP {status}: {text}");
    }

    /// v2 `DELETE /v2/keys/KEY`.
    pub fn v2_delete(&self, key: &str) {
        let (status, text, retried) = self.call("DELETE", &format!("/v2/keys/{}", key.trim_start_matches('/')), &[], b"");
        // A retried delete may find the key gone by its first attempt.
        assert!(status == 200 || (retried && status == 404), "etcd v2 delete {key}: HTTP {status}: {text}");
    }
}

fn revision(v: &serde_json::Value) -> u64 {
    let r = &v["header"]["revision"];
    r.as_str().and_then(|s| s.parse().ok()).or_else(|| r.as_u64()).unwrap_or_else(|| panic!("no revision in {v}"))
}

/// A transparent TCP relay on a free loopback port in front of `127.0.0.1:target`, that a
/// test can cut and open again. Stops (closing its connections) when dropped.
pub struct Gate {
    port: u16,
    open: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Gate {
    pub fn start(target: u16) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").expect("gate: bind 127.0.0.1:0");
        let port = listener.local_addr().expect("gate addr").port();
        let (open, stop, conns) = (Arc::new(AtomicBool::new(true)), Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Vec::new())));
        let (o, s, c) = (open.clone(), stop.clone(), conns.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                if !o.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let mut list = c.lock().unwrap_or_else(|e| e.into_inner());
                for sock in [&client, &server] {
                    if let Ok(k) = sock.try_clone() {
                        list.push(k);
                    }
                }
                drop(list);
                relay(client, server);
            }
        });
        Gate { port, open, stop, conns }
    }

    /// `127.0.0.1:PORT`, for an `upsync` line.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Closes every connection through the gate and refuses new ones until [`Gate::open`].
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for s in self.conns.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    pub fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cut();
        // Wake the accept loop so it sees `stop`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Copies bytes both ways until either side closes.
fn relay(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else { return };
    pump(a, b2);
    pump(b, a2);
}

fn pump(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}
