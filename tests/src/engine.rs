//! The two container engines the sidecar's tests run against, behind one small interface so
//! the same test body runs on both: the Docker Engine ([`crate::docker::Docker`], the machine's
//! `dockerd`) and podman's Docker-compatible API service ([`crate::podman::Podman`], a private
//! instance per test).
//!
//! Their command lines differ in small ways this hides: `docker rm` has no `--time`, Docker's
//! container names are global on the daemon (so test containers get unique names from
//! [`Engine::unique`]), and only Docker runs health checks without systemd.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::docker::Docker;
use crate::podman::{Httpd, Podman};
use crate::sidecar::SidecarOpts;

/// Which engine a test body runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Docker,
    Podman,
}

pub trait Engine {
    fn kind(&self) -> Kind;
    /// The API socket to give the sidecar (`--docker-socket`).
    fn socket(&self) -> PathBuf;
    /// A container name unique to this test (Docker: `NAME-UNIQ`; podman: `NAME`, its store is
    /// the test's own).
    fn unique(&self, name: &str) -> String;
    /// The engine's command line tool, configured for this instance.
    fn command(&self) -> Command;
    /// Runs the command line tool with `args`; its stdout, or the error with stderr.
    fn try_cli(&self, args: &[&str]) -> Result<String, String>;
    /// Starts an httpd container; returns its id.
    fn run_httpd(&self, c: &Httpd) -> String;
    /// The container's state (`running`, `exited`...), `None` if unknown.
    fn state(&self, name: &str) -> Option<String>;
    /// Cuts the API service (containers keep running) / restores it.
    fn stop_service(&mut self);
    fn start_service(&mut self);

    /// The sidecar's options for this engine: its socket and, for Docker (shared by every test
    /// on the machine), `--container-label` so that it sees only this test's containers.
    fn sidecar_opts(&self, node_id: &str) -> SidecarOpts {
        let mut opts = SidecarOpts::new(node_id, &self.socket());
        opts.extra_args.extend(self.sidecar_args());
        opts
    }

    /// The sidecar's arguments that keep it to this instance's containers.
    fn sidecar_args(&self) -> Vec<String> {
        Vec::new()
    }

    /// Runs the command line tool and panics with its stderr if it fails.
    fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Removes a container at once (SIGKILL, no stop timeout).
    fn remove(&self, name: &str) {
        match self.kind() {
            Kind::Docker => self.cli(&["rm", "--force", name]),
            Kind::Podman => self.cli(&["rm", "--force", "--time", "0", name]),
        };
    }

    /// Starts `stop NAME` in the background (the stop timeout runs); wait on the child.
    fn spawn_stop(&self, name: &str) -> std::process::Child {
        self.command().args(["stop", name]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("starting `stop`")
    }
}

impl Engine for Docker {
    fn kind(&self) -> Kind {
        Kind::Docker
    }
    fn socket(&self) -> PathBuf {
        self.socket.clone()
    }
    fn unique(&self, name: &str) -> String {
        Docker::unique(self, name)
    }
    fn command(&self) -> Command {
        Docker::command(self)
    }
    fn try_cli(&self, args: &[&str]) -> Result<String, String> {
        self.try_docker(args)
    }
    fn run_httpd(&self, c: &Httpd) -> String {
        Docker::run_httpd(self, c)
    }
    fn state(&self, name: &str) -> Option<String> {
        Docker::state(self, name)
    }
    fn stop_service(&mut self) {
        Docker::stop_service(self)
    }
    fn sidecar_args(&self) -> Vec<String> {
        vec!["--container-label".into(), format!("upsync-test={}", self.uniq)]
    }
    fn start_service(&mut self) {
        Docker::start_service(self)
    }
}

impl Engine for Podman {
    fn kind(&self) -> Kind {
        Kind::Podman
    }
    fn socket(&self) -> PathBuf {
        self.socket.clone()
    }
    fn unique(&self, name: &str) -> String {
        name.to_string()
    }
    fn command(&self) -> Command {
        Podman::command(self)
    }
    fn try_cli(&self, args: &[&str]) -> Result<String, String> {
        self.try_podman(args)
    }
    fn run_httpd(&self, c: &Httpd) -> String {
        Podman::run_httpd(self, c)
    }
    fn state(&self, name: &str) -> Option<String> {
        Podman::state(self, name)
    }
    fn stop_service(&mut self) {
        Podman::stop_service(self)
    }
    fn start_service(&mut self) {
        Podman::start_service(self)
    }
}

/// Starts the engine of `kind` for a test (Docker through its API forwarder when `proxied`,
/// so that the test can cut the API).
pub fn start(kind: Kind, test_dir: &Path, proxied: bool) -> Box<dyn Engine> {
    match kind {
        Kind::Docker if proxied => Box::new(Docker::start(test_dir).proxied()),
        Kind::Docker => Box::new(Docker::start(test_dir)),
        Kind::Podman => Box::new(Podman::start(test_dir)),
    }
}

/// `#[test]` functions running a test body `fn(Kind)` once per engine: `docker::NAME` and
/// `podman::NAME` (`cargo test docker::` runs the Docker ones).
#[macro_export]
macro_rules! on_both_engines {
    ($($name:ident => $body:ident;)*) => {
        mod docker {
            $(#[test] fn $name() { super::$body($crate::engine::Kind::Docker) })*
        }
        mod podman {
            $(#[test] fn $name() { super::$body($crate::engine::Kind::Podman) })*
        }
    };
}

/// A test directory name for `name` on `kind`: `NAME_docker`, `NAME_podman`.
pub fn dir_name(name: &str, kind: Kind) -> String {
    format!("{name}_{}", if kind == Kind::Docker { "docker" } else { "podman" })
}

/// The test image's root file system in `root`: busybox with relative applet links (its own
/// `--install` would link to the host's absolute path), `/tmp`, and `/www/index.html` for
/// `httpd`. Docker imports it from a tar, podman builds it from a Containerfile.
pub fn busybox_rootfs(root: &Path) {
    let bin = root.join("bin");
    for d in [bin.clone(), root.join("tmp"), root.join("www")] {
        std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("creating {}: {e}", d.display()));
    }
    std::fs::copy("/bin/busybox", bin.join("busybox")).expect("copying /bin/busybox");
    let list = Command::new("/bin/busybox").arg("--list").output().expect("busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).split_whitespace() {
        if applet != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", bin.join(applet));
        }
    }
    std::fs::write(root.join("www/index.html"), "upsync test image\n").expect("index.html");
}

/// Runs `cmd` (the engine's CLI, named `what`) with `args`: its stdout, trimmed, or an error
/// naming the command with its exit status and stderr.
pub fn stdout_of(mut cmd: Command, what: &str, args: &[&str]) -> Result<String, String> {
    let out = cmd.args(args).output().map_err(|e| format!("running {what} {args:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!("{what} {args:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()))
    }
}
