//! The real Docker Engine for the sidecar's tests: the machine's `dockerd` on
//! `/var/run/docker.sock` (`DOCKER_HOST` is not read), shared with whatever else runs there, so
//! an instance only ever touches what it created:
//!
//! - an image `upsync-httpd:test-UNIQ`, made with `docker import` from a tar of a directory
//!   holding the host's static `/bin/busybox` and relative applet links (no registry);
//! - a bridge network `upsync-test-UNIQ` for containers with published ports (bound to
//!   127.0.0.1 only);
//! - containers labelled `upsync-test=UNIQ`, whose names the tests make unique with
//!   [`Docker::unique`] (Docker's names are global on the daemon, and tests run in parallel).
//!
//! Dropping a [`Docker`] removes its containers (by label), its network and its image, also
//! when the test failed. The engine itself cannot be restarted by a test (it is the machine's):
//! [`Docker::proxied`] puts a unix-socket forwarder in front of it, whose stop and start cut
//! and restore the API for the sidecar exactly as a restart of the API service would (the
//! event stream and every connection break; the containers keep running).
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use crate::podman::{Httpd, Net};

/// The Docker Engine's API socket.
pub const DOCKER_SOCKET: &str = "/var/run/docker.sock";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A test's view of the machine's Docker Engine. See the module documentation.
pub struct Docker {
    /// Unique per instance: in the image tag, network name, container label and names.
    pub uniq: String,
    pub image: String,
    pub network: String,
    /// The socket the sidecar is given: the engine's, or the forwarder's.
    pub socket: PathBuf,
    run_dir: PathBuf,
    proxy: Option<SocketProxy>,
}

fn docker_bin() -> PathBuf {
    for p in ["/usr/bin/docker", "/usr/local/bin/docker"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!("docker not found in /usr/bin or /usr/local/bin: run `make deps` (installs docker.io) and start dockerd");
}

impl Docker {
    /// Builds the image and creates the network. Panics (saying what to do) if the engine does
    /// not answer.
    pub fn start(test_dir: &Path) -> Docker {
        assert!(Path::new("/bin/busybox").exists(), "/bin/busybox not found: run `make deps` (installs busybox-static)");
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let uniq = format!("{}x{n}", std::process::id());
        let run_dir = PathBuf::from(format!("/tmp/upsync-docker-{uniq}"));
        let _ = std::fs::remove_dir_all(&run_dir);
        std::fs::create_dir_all(&run_dir).unwrap_or_else(|e| panic!("creating {}: {e}", run_dir.display()));
        let d = Docker {
            image: format!("upsync-httpd:test-{uniq}"),
            network: format!("upsync-test-{uniq}"),
            socket: PathBuf::from(DOCKER_SOCKET),
            uniq,
            run_dir,
            proxy: None,
        };
        if let Err(e) = d.try_docker(&["version", "--format", "{{.Server.Version}}"]) {
            panic!("the Docker Engine does not answer on {DOCKER_SOCKET}: {e}\n(run `make deps`, then `systemctl start docker`)");
        }
        d.build_image(test_dir);
        d.docker(&["network", "create", "--label", &format!("upsync-test={}", d.uniq), &d.network]);
        d
    }

    /// The sidecar talks to the engine through a forwarder that [`Docker::stop_service`] and
    /// [`Docker::start_service`] cut and restore.
    pub fn proxied(mut self) -> Docker {
        let path = self.run_dir.join("docker.sock");
        self.proxy = Some(SocketProxy::start(&path));
        self.socket = path;
        self
    }

    /// A container name unique to this instance: `NAME-UNIQ`.
    pub fn unique(&self, name: &str) -> String {
        format!("{name}-{}", self.uniq)
    }

    /// A `docker` command.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(docker_bin());
        cmd.env_remove("DOCKER_HOST").env_remove("DOCKER_CONTEXT");
        cmd
    }

    /// Runs `docker ARGS`; its stdout, or the error with stderr.
    pub fn try_docker(&self, args: &[&str]) -> Result<String, String> {
        crate::engine::stdout_of(self.command(), "docker", args)
    }

    /// Runs `docker ARGS` and panics with its stderr if it fails.
    pub fn docker(&self, args: &[&str]) -> String {
        self.try_docker(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The image: busybox with relative applet links, imported from a tar of its directory.
    fn build_image(&self, test_dir: &Path) {
        let root = self.run_dir.join("rootfs");
        crate::engine::busybox_rootfs(&root);
        let tar = self.run_dir.join("rootfs.tar");
        let out = Command::new("tar").arg("-C").arg(&root).arg("-cf").arg(&tar).arg(".").output().expect("running tar");
        assert!(out.status.success(), "tar of {} failed: {}", root.display(), String::from_utf8_lossy(&out.stderr));
        let tar = tar.display().to_string();
        if let Err(e) = self.try_docker(&["import", "--change", "ENV PATH=/bin", "--change", "CMD [\"/bin/sh\"]", &tar, &self.image]) {
            let _ = std::fs::write(test_dir.join("docker-import.log"), &e);
            panic!("{e}");
        }
    }

    /// `docker run -d` of an httpd container (labelled as this instance's); returns its id.
    pub fn run_httpd(&self, c: &Httpd) -> String {
        let mut args: Vec<String> = vec!["run".into(), "-d".into(), "--name".into(), c.name.clone()];
        args.extend(["--label".into(), format!("upsync-test={}", self.uniq)]);
        let port = match c.net {
            Net::Host { port } => {
                args.extend(["--network".into(), "host".into()]);
                format!("127.0.0.1:{port}")
            }
            Net::Publish { host_port } => {
                args.extend(["--network".into(), self.network.clone(), "-p".into(), format!("127.0.0.1:{host_port}:80")]);
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
        if let Some(cmd) = &c.health_cmd {
            args.extend([
                "--health-cmd".into(),
                cmd.clone(),
                "--health-interval".into(),
                "1s".into(),
                "--health-retries".into(),
                "1".into(),
            ]);
        }
        args.push(self.image.clone());
        args.extend(["sh".into(), "-c".into(), c.script(&port)]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.docker(&refs)
    }

    /// The container's state as Docker reports it (`running`, `exited`...), `None` if unknown.
    pub fn state(&self, name: &str) -> Option<String> {
        self.try_docker(&["inspect", "--format", "{{.State.Status}}", name]).ok()
    }

    /// Cuts the API (the forwarder stops; every connection through it breaks).
    pub fn stop_service(&mut self) {
        self.proxy.as_mut().expect("stop_service needs Docker::proxied()").stop();
    }

    /// Restores the API on the same socket path.
    pub fn start_service(&mut self) {
        let path = self.socket.clone();
        let proxy = self.proxy.as_mut().expect("start_service needs Docker::proxied()");
        assert!(proxy.stopped(), "the Docker API forwarder is already running");
        *proxy = SocketProxy::start(&path);
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        if let Some(p) = self.proxy.as_mut() {
            p.stop();
        }
        let label = format!("label=upsync-test={}", self.uniq);
        match self.try_docker(&["ps", "-aq", "--filter", &label]) {
            Ok(ids) => {
                let ids: Vec<&str> = ids.split_whitespace().collect();
                if !ids.is_empty() {
                    let mut args = vec!["rm", "--force", "--volumes"];
                    args.extend(ids);
                    if let Err(e) = self.try_docker(&args) {
                        eprintln!("removing the test's containers: {e}");
                    }
                }
            }
            Err(e) => eprintln!("listing the test's containers: {e}"),
        }
        if let Err(e) = self.try_docker(&["network", "rm", &self.network]) {
            eprintln!("removing the test's network: {e}");
        }
        if let Err(e) = self.try_docker(&["image", "rm", "--force", &self.image]) {
            eprintln!("removing the test's image: {e}");
        }
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

/// A unix-socket forwarder to the Docker Engine's socket (one thread pair per connection).
struct SocketProxy {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<UnixStream>>>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl SocketProxy {
    fn start(path: &Path) -> SocketProxy {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).unwrap_or_else(|e| panic!("binding {}: {e}", path.display()));
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
        let accept = {
            let (stop, conns) = (stop.clone(), conns.clone());
            std::thread::spawn(move || {
                for client in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(client) = client else { continue };
                    let Ok(engine) = UnixStream::connect(DOCKER_SOCKET) else { continue };
                    let mut list = conns.lock().unwrap();
                    for s in [&client, &engine] {
                        if let Ok(c) = s.try_clone() {
                            list.push(c);
                        }
                    }
                    drop(list);
                    for (from, to) in [(&client, &engine), (&engine, &client)] {
                        let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else { continue };
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut to);
                            let _ = to.shutdown(std::net::Shutdown::Write);
                        });
                    }
                }
            })
        };
        SocketProxy { path: path.to_path_buf(), stop, conns, accept: Some(accept) }
    }

    fn stopped(&self) -> bool {
        self.accept.is_none()
    }

    fn stop(&mut self) {
        let Some(accept) = self.accept.take() else { return };
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.path); // wakes the accept loop
        let _ = accept.join();
        let _ = std::fs::remove_file(&self.path);
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}
