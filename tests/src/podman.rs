//! A real container engine for the sidecar's tests: podman's Docker-compatible API service
//! (`podman system service`) on a unix socket, with its own configuration and storage, and a
//! small busybox httpd image built offline from the host's static `/bin/busybox`.
//!
//! Everything podman writes goes under one short run directory in `/tmp` (unix socket and
//! conmon paths must stay under 108 bytes): `containers.conf` and `storage.conf` (pointed at by
//! `CONTAINERS_CONF` / `CONTAINERS_STORAGE_CONF`), the vfs store, the run root, the events file
//! and file locks (`lock_type = "file"`, so nothing is shared through `/dev/shm`). Nothing
//! touches the system's default store. Containers use the host network or slirp4netns (user
//! mode, no bridges or firewall rules on the host). Dropping a [`Podman`] removes its
//! containers, stops its service and deletes the run directory; the service's log stays in
//! the test directory.
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::proc::Proc;

/// The image every test container runs: busybox with `httpd`, `sh`, `sleep`...
pub const IMAGE: &str = "localhost/upsync-httpd:test";

/// How a test container is reached.
#[derive(Clone, Copy, Debug)]
pub enum Net {
    /// Host network; httpd listens on 127.0.0.1:port. (podman does not report `--expose` for
    /// host-network containers: the sidecar learns the port from a `SERVICE_<port>_NAME` label.)
    Host { port: u16 },
    /// slirp4netns with container port 80 published on 127.0.0.1:host_port.
    Publish { host_port: u16 },
}

/// A busybox httpd container answering `GET /` with its own name.
#[derive(Clone, Debug)]
pub struct Httpd {
    pub name: String,
    pub net: Net,
    pub labels: Vec<(String, String)>,
    pub env: Vec<(String, String)>,
    /// `--stop-timeout` in seconds (podman's default is 10). httpd runs as PID 1 and ignores
    /// SIGTERM, so `podman stop` always waits this long before SIGKILL: a drain window.
    pub stop_timeout: Option<u32>,
    /// Seconds the container waits before httpd starts listening (a slow application start).
    pub start_delay: u32,
    /// The engine's own health check (`--health-cmd`, every second, unhealthy after one
    /// failure). Run by [`crate::docker::Docker`] only: podman runs health checks from systemd
    /// timers, which the test machine's podman has not.
    pub health_cmd: Option<String>,
}

impl Httpd {
    pub fn new(name: &str, net: Net) -> Httpd {
        Httpd { name: name.to_string(), net, labels: Vec::new(), env: Vec::new(), stop_timeout: None, start_delay: 0, health_cmd: None }
    }

    pub fn start_delay(mut self, secs: u32) -> Httpd {
        self.start_delay = secs;
        self
    }

    pub fn label(mut self, k: &str, v: &str) -> Httpd {
        self.labels.push((k.to_string(), v.to_string()));
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Httpd {
        self.env.push((k.to_string(), v.to_string()));
        self
    }

    pub fn health_cmd(mut self, cmd: &str) -> Httpd {
        self.health_cmd = Some(cmd.to_string());
        self
    }

    /// The container's command: wait `start_delay`, write its name as the page, run httpd on
    /// `listen` (`PORT` or `IP:PORT`).
    pub fn script(&self, listen: &str) -> String {
        let sleep = if self.start_delay > 0 { format!("sleep {} && ", self.start_delay) } else { String::new() };
        format!("{sleep}mkdir -p /tmp/www && echo {} > /tmp/www/index.html && exec httpd -f -p {listen} -h /tmp/www", self.name)
    }

    pub fn stop_timeout(mut self, secs: u32) -> Httpd {
        self.stop_timeout = Some(secs);
        self
    }

    /// `127.0.0.1:PORT` where the container answers.
    pub fn host_port(&self) -> String {
        match self.net {
            Net::Host { port } => format!("127.0.0.1:{port}"),
            Net::Publish { host_port } => format!("127.0.0.1:{host_port}"),
        }
    }
}

/// A podman API service with its own store. See the module documentation.
pub struct Podman {
    run_dir: PathBuf,
    log: PathBuf,
    pub socket: PathBuf,
    service: Option<Proc>,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn podman_bin() -> PathBuf {
    for p in ["/usr/bin/podman", "/usr/local/bin/podman"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!("podman not found in /usr/bin or /usr/local/bin: run `make deps` (installs podman, runc, slirp4netns, busybox-static)");
}

impl Podman {
    /// Writes the configuration, builds the image and starts the API service; its log goes to
    /// `test_dir/podman-service.log`.
    pub fn start(test_dir: &Path) -> Podman {
        assert!(Path::new("/bin/busybox").exists(), "/bin/busybox not found: run `make deps` (installs busybox-static)");
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let run_dir = PathBuf::from(format!("/tmp/upsync-podman-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run_dir);
        std::fs::create_dir_all(&run_dir).unwrap_or_else(|e| panic!("creating {}: {e}", run_dir.display()));
        let mut p = Podman { socket: run_dir.join("docker.sock"), log: test_dir.join("podman-service.log"), run_dir, service: None };
        p.write_config();
        p.build_image(test_dir);
        p.start_service();
        p
    }

    fn write_config(&self) {
        let d = self.run_dir.display();
        let containers = format!(
            r#"[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
netns = "slirp4netns"
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{d}/events.log"
tmp_dir = "{d}/tmp"
static_dir = "{d}/store/libpod"
volume_path = "{d}/store/volumes"
lock_type = "file"

[network]
network_config_dir = "{d}/networks"
"#
        );
        let storage = format!("[storage]\ndriver = \"vfs\"\nrunroot = \"{d}/run\"\ngraphroot = \"{d}/store\"\n");
        std::fs::write(self.run_dir.join("containers.conf"), containers).expect("writing containers.conf");
        std::fs::write(self.run_dir.join("storage.conf"), storage).expect("writing storage.conf");
    }

    /// A `podman` command using this instance's configuration.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(podman_bin());
        cmd.env("CONTAINERS_CONF", self.run_dir.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.run_dir.join("storage.conf"))
            .env("TMPDIR", self.run_dir.join("tmp"));
        cmd
    }

    /// Runs `podman ARGS`; its stdout, or the error with stderr.
    pub fn try_podman(&self, args: &[&str]) -> Result<String, String> {
        let _ = std::fs::create_dir_all(self.run_dir.join("tmp"));
        crate::engine::stdout_of(self.command(), "podman", args)
    }

    /// Runs `podman ARGS` and panics with its stderr if it fails.
    pub fn podman(&self, args: &[&str]) -> String {
        self.try_podman(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The image: a scratch image with busybox and relative applet links (`busybox --install`
    /// would link to the host's absolute path). Built with `podman build`, inside a private
    /// mount namespace with a tmpfs over `/var/lib`: containers/image keeps a blob-info cache in
    /// `/var/lib/containers/cache` for root whatever the configuration says, and the test must
    /// not write there. (`podman import` would write there too.)
    fn build_image(&self, test_dir: &Path) {
        let ctx = self.run_dir.join("image");
        crate::engine::busybox_rootfs(&ctx.join("rootfs"));
        std::fs::write(ctx.join("Containerfile"), "FROM scratch\nCOPY rootfs/ /\nENV PATH=/bin\nCMD [\"/bin/sh\"]\n")
            .expect("Containerfile");
        let build = format!(
            "mount -t tmpfs upsync-test-build /var/lib && exec {} build --quiet --network none -t {IMAGE} -f {} {}",
            podman_bin().display(),
            ctx.join("Containerfile").display(),
            ctx.display()
        );
        let env = self.command();
        let out = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c", &build])
            .envs(env.get_envs().filter_map(|(k, v)| v.map(|v| (k.to_owned(), v.to_owned()))))
            .output()
            .expect("running unshare + podman build");
        if !out.status.success() {
            let log = test_dir.join("podman-build.log");
            let _ = std::fs::write(&log, [&out.stdout[..], &out.stderr[..]].concat());
            panic!("podman build of {IMAGE} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
        }
    }

    /// Starts the API service (again) on the same socket and waits until it answers.
    pub fn start_service(&mut self) {
        assert!(self.service.is_none(), "the podman service is already running");
        let _ = std::fs::remove_file(&self.socket);
        std::fs::create_dir_all(self.run_dir.join("tmp")).expect("tmp dir");
        let mut cmd = self.command();
        cmd.args(["system", "service", "--time=0"]).arg(format!("unix://{}", self.socket.display()));
        let mut proc = Proc::spawn("podman system service", cmd, &self.log).expect("starting podman system service");
        let start = Instant::now();
        while !self.ping() {
            if !proc.is_running() || start.elapsed() > Duration::from_secs(30) {
                panic!("podman system service did not answer on {} (log: {}):\n{}", self.socket.display(), self.log.display(), proc.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.service = Some(proc);
    }

    /// Stops the API service (SIGTERM, as systemd would); containers keep running.
    pub fn stop_service(&mut self) {
        if let Some(mut p) = self.service.take() {
            p.stop_with(libc::SIGTERM, Duration::from_secs(10));
        }
    }

    /// Whether the service answers `/_ping`.
    pub fn ping(&self) -> bool {
        self.api_get("/_ping").is_some_and(|(status, body)| status == 200 && body.trim() == "OK")
    }

    /// A `GET` on the service's Docker-compatible API: (status, body).
    pub fn api_get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = UnixStream::connect(&self.socket).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: podman\r\n\r\n").ok()?;
        let mut raw = String::new();
        s.read_to_string(&mut raw).ok()?;
        let (head, body) = raw.split_once("\r\n\r\n")?;
        let status = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, body.to_string()))
    }

    /// `podman run -d` of an httpd container; returns its id.
    pub fn run_httpd(&self, c: &Httpd) -> String {
        let mut args: Vec<String> = vec!["run".into(), "-d".into(), "--name".into(), c.name.clone()];
        let port = match c.net {
            Net::Host { port } => {
                args.extend(["--network".into(), "host".into()]);
                format!("127.0.0.1:{port}")
            }
            Net::Publish { host_port } => {
                args.extend(["--network".into(), "slirp4netns".into(), "-p".into(), format!("127.0.0.1:{host_port}:80")]);
                "80".to_string()
            }
        };
        for (k, v) in &c.labels {
            args.extend(["--label".into(), format!("{k}={v}")]);
        }
        for (k, v) in &c.env {
            args.extend(["-e".into(), format!("{k}={v}")]);
        }
        if let Some(t) = c.stop_timeout {
            args.extend(["--stop-timeout".into(), t.to_string()]);
        }
        args.push(IMAGE.into());
        args.extend(["sh".into(), "-c".into(), c.script(&port)]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.podman(&refs)
    }

    /// The container's state as podman reports it (`running`, `exited`...), `None` if unknown.
    pub fn state(&self, name: &str) -> Option<String> {
        self.try_podman(&["inspect", "--format", "{{.State.Status}}", name]).ok()
    }
}

impl Podman {
    /// PIDs of processes working on this instance's store (conmon, and the `podman container
    /// cleanup` conmon runs when a container exits): their command lines name the run directory.
    fn store_processes(&self) -> Vec<u32> {
        let dir = self.run_dir.to_string_lossy().to_string();
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
            .filter(|pid| *pid != std::process::id() && crate::proc::cmdline(*pid).contains(&dir))
            .collect()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        if self.run_dir.join("storage.conf").exists() {
            if let Err(e) = self.try_podman(&["rm", "--all", "--force", "--time", "0"]) {
                eprintln!("removing the test's containers: {e}");
            }
        }
        self.stop_service();
        // Containers' exit handlers run asynchronously and would write into the directory after
        // it is removed: wait for them first.
        let start = Instant::now();
        while !self.store_processes().is_empty() && start.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Err(e) = std::fs::remove_dir_all(&self.run_dir) {
            eprintln!("removing {}: {e}", self.run_dir.display());
        }
    }
}
