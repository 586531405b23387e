//! Debian's nginx (or `UPSYNC_NGINX`) with the built module, run in the foreground with its own
//! prefix, config, pid file and logs inside the test's directory.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::net::{free_port, port_open};
use crate::proc::{alive, children_of, cmdline, Proc};
use crate::wait::wait_until;

/// An nginx.conf built from the harness's template. `http` is the body of the `http {}` block;
/// in it (and in `main`), `{{port}}` is replaced with the port the harness picked, `{{dir}}`
/// with the nginx prefix directory, and `{{portN}}` (N = 1..9) with further free ports.
#[derive(Clone, Debug)]
pub struct NginxConf {
    pub workers: usize,
    pub load_module: bool,
    pub main: String,
    pub http: String,
    /// The body of a `stream {}` block (None: no stream block, no stream module loaded). With
    /// it, nginx's stream module (when dynamic) and the upsync stream module are loaded.
    pub stream: Option<String>,
    pub error_log_level: String,
    /// Run nginx in a mount namespace of its own where this file is `/etc/resolv.conf` (for
    /// tests with a resolver that never answers); None: the machine's resolver.
    pub resolv_conf: Option<PathBuf>,
    /// The nginx binary to run (None: [`crate::paths::nginx_bin`]); see [`NginxConf::nginx128`].
    pub binary: Option<PathBuf>,
    /// Load the module built for nginx 1.28 ([`crate::paths::nginx128_module_so`]) instead of
    /// [`crate::paths::module_so`].
    pub module128: bool,
}

impl NginxConf {
    pub fn new(http: &str) -> NginxConf {
        NginxConf {
            workers: 1,
            load_module: true,
            main: String::new(),
            http: http.to_string(),
            stream: None,
            // UPSYNC_NGINX_LOG_LEVEL=debug runs every test's nginx with debug logging (which
            // takes other code paths in nginx, e.g. its timer code reads ev->data).
            error_log_level: std::env::var("UPSYNC_NGINX_LOG_LEVEL").unwrap_or_else(|_| "info".into()),
            resolv_conf: None,
            binary: None,
            module128: false,
        }
    }

    /// Runs nginx 1.28 (`make build NGINX=1.28`, [`crate::paths::nginx128_bin`]) with the module
    /// built for it, whatever `UPSYNC_NGINX` says: for tests and benchmarks of features only
    /// nginx >= 1.27.3 has (`server NAME resolve`), beside the module.
    pub fn nginx128(mut self) -> Self {
        self.binary = Some(crate::paths::nginx128_bin());
        self.module128 = true;
        self
    }

    fn nginx_bin(&self) -> PathBuf {
        self.binary.clone().unwrap_or_else(crate::paths::nginx_bin)
    }

    /// nginx sees `file` as `/etc/resolv.conf` (its own mount namespace; the machine's file is
    /// untouched).
    pub fn resolv_conf(mut self, file: &Path) -> Self {
        self.resolv_conf = Some(file.to_path_buf());
        self
    }

    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    /// With a `stream {}` block of body `stream` (same placeholders as `http`) and the stream
    /// modules loaded (unless `without_module`: then only nginx's own stream module).
    pub fn stream(mut self, stream: &str) -> Self {
        self.stream = Some(stream.to_string());
        self
    }

    /// Without the `load_module` line (stock nginx).
    pub fn without_module(mut self) -> Self {
        self.load_module = false;
        self
    }

    /// Extra lines for the main context (e.g. `env CONSUL_TOKEN;`).
    pub fn main(mut self, text: &str) -> Self {
        self.main.push_str(text);
        self.main.push('\n');
        self
    }

    pub fn log_level(mut self, level: &str) -> Self {
        self.error_log_level = level.into();
        self
    }

    fn render(&self, dir: &Path, ports: &[u16]) -> String {
        let mut module = if self.load_module {
            let so = if self.module128 { crate::paths::nginx128_module_so() } else { crate::paths::module_so() };
            format!("load_module {};", so.display())
        } else {
            String::new()
        };
        if self.stream.is_some() {
            if let Some(core) = crate::paths::nginx_stream_core_module() {
                module.push_str(&format!("\nload_module {};", core.display()));
            }
            if self.load_module {
                module.push_str(&format!("\nload_module {};", crate::paths::stream_module_so().display()));
            }
        }
        let stream = self.stream.as_ref().map(|s| format!("stream {{\n{s}\n}}\n")).unwrap_or_default();
        let d = dir.display().to_string();
        let mut text = format!(
            "{module}
daemon off;
master_process on;
user root root;
worker_processes {workers};
worker_shutdown_timeout 60s;
error_log {d}/error.log {level};
pid {d}/nginx.pid;
{main}
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
{http}
}}
{stream}",
            workers = self.workers,
            level = self.error_log_level,
            main = self.main,
            http = self.http,
        );
        text = text.replace("{{dir}}", &d).replace("{{port}}", &ports[0].to_string());
        for (i, p) in ports.iter().enumerate().skip(1) {
            text = text.replace(&format!("{{{{port{i}}}}}"), &p.to_string());
        }
        text
    }
}

/// The outcome of `nginx -t`.
pub struct ConfigTest {
    pub ok: bool,
    /// nginx's stderr (where `nginx -t` reports).
    pub output: String,
}

/// A running nginx master and its workers. Stopped (QUIT, then KILL of the group) when dropped.
pub struct Nginx {
    proc: Option<Proc>,
    dir: PathBuf,
    ports: Vec<u16>,
    conf: NginxConf,
}

impl Nginx {
    fn prepare(dir: &Path, conf: &NginxConf, ports: &[u16]) -> PathBuf {
        std::fs::create_dir_all(dir.join("tmp")).expect("nginx tmp dir");
        std::fs::create_dir_all(dir.join("logs")).expect("nginx logs dir");
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf.render(dir, ports)).expect("writing nginx.conf");
        path
    }

    fn fresh_ports() -> Vec<u16> {
        (0..10).map(|_| free_port()).collect()
    }

    /// Runs `nginx -t` on `conf` in `dir`.
    pub fn test_config(dir: &Path, conf: &NginxConf) -> ConfigTest {
        let path = Nginx::prepare(dir, conf, &Nginx::fresh_ports());
        Nginx::test_config_file_with(&conf.nginx_bin(), dir, &path)
    }

    /// Runs `nginx -t -c FILE` with `dir` as prefix (for example configs of the repository).
    pub fn test_config_file(dir: &Path, file: &Path) -> ConfigTest {
        Nginx::test_config_file_with(&crate::paths::nginx_bin(), dir, file)
    }

    fn test_config_file_with(nginx: &Path, dir: &Path, file: &Path) -> ConfigTest {
        std::fs::create_dir_all(dir.join("logs")).ok();
        let out = Command::new(nginx)
            .arg("-t")
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(file)
            .arg("-e")
            .arg(dir.join("error.log"))
            .output()
            .expect("running nginx -t");
        ConfigTest { ok: out.status.success(), output: String::from_utf8_lossy(&out.stderr).into_owned() }
    }

    /// Starts nginx with `conf` and waits until it accepts connections on `{{port}}`.
    pub fn start(dir: &Path, conf: NginxConf) -> Nginx {
        let mut last = String::new();
        for _ in 0..3 {
            let ports = Nginx::fresh_ports();
            let mut n = Nginx { proc: None, dir: dir.to_path_buf(), ports, conf: conf.clone() };
            match n.launch() {
                Ok(()) => return n,
                Err(e) => {
                    last = e.to_string();
                    if !last.contains("Address already in use") {
                        break;
                    }
                }
            }
        }
        panic!("nginx did not start: {last}");
    }

    /// Starts nginx and returns the error instead of panicking (for start-up failure tests).
    pub fn try_start(dir: &Path, conf: NginxConf) -> anyhow::Result<Nginx> {
        let mut n = Nginx { proc: None, dir: dir.to_path_buf(), ports: Nginx::fresh_ports(), conf };
        n.launch()?;
        Ok(n)
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        let path = Nginx::prepare(&self.dir, &self.conf, &self.ports);
        let mut cmd = match &self.conf.resolv_conf {
            None => Command::new(self.conf.nginx_bin()),
            Some(file) => {
                // unshare and sh exec in place: the PID stays nginx's master.
                let mut c = Command::new("unshare");
                c.args(["--mount", "--propagation", "private", "--", "sh", "-c", "mount --bind \"$0\" /etc/resolv.conf && exec \"$@\""])
                    .arg(file)
                    .arg(self.conf.nginx_bin());
                c
            }
        };
        cmd.arg("-p").arg(&self.dir).arg("-c").arg(&path).arg("-e").arg(self.dir.join("error.log"));
        let mut proc = Proc::spawn("nginx", cmd, &self.dir.join("nginx.stderr.log"))?;
        let start = std::time::Instant::now();
        loop {
            if port_open(self.ports[0]) {
                break;
            }
            if let Some(st) = proc.try_wait() {
                anyhow::bail!(
                    "nginx exited ({st}) at start-up:\n{}\n{}",
                    proc.log(),
                    std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
                );
            }
            if start.elapsed() > Duration::from_secs(30) {
                anyhow::bail!("nginx did not listen on 127.0.0.1:{} within 30 s", self.ports[0]);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.proc = Some(proc);
        let want = self.conf.workers;
        wait_until("nginx workers", Duration::from_secs(30), || self.worker_pids().len() >= want);
        Ok(())
    }

    /// The port `{{port}}` was replaced with.
    pub fn port(&self) -> u16 {
        self.ports[0]
    }

    /// The port `{{portN}}` was replaced with.
    pub fn extra_port(&self, n: usize) -> u16 {
        self.ports[n]
    }

    /// `http://127.0.0.1:PORT` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.ports[0])
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn master_pid(&self) -> u32 {
        self.proc.as_ref().map(|p| p.pid()).unwrap_or(0)
    }

    /// PIDs of the master's children that are worker processes (including ones shutting down).
    pub fn worker_pids(&self) -> Vec<u32> {
        children_of(self.master_pid()).into_iter().filter(|p| cmdline(*p).contains("worker process")).collect()
    }

    /// The module's Consul poller processes, as (worker, poller) PIDs: a poller is a child of
    /// the leader worker that forked it, titled "upsync poller of worker PID" (the stream
    /// module's "upsync stream poller ...").
    pub fn poller_pids(&self) -> Vec<(u32, u32)> {
        self.worker_pids()
            .into_iter()
            .flat_map(|w| children_of(w).into_iter().filter(|p| cmdline(*p).contains("poller of worker")).map(move |p| (w, p)))
            .collect()
    }

    /// Every process of this nginx: the master, its workers and the module's poller processes
    /// (e.g. to count nginx's connections to Consul, which the pollers hold).
    pub fn process_pids(&self) -> Vec<u32> {
        crate::proc::tree_of(self.master_pid())
    }

    /// Workers not shutting down.
    pub fn active_worker_pids(&self) -> Vec<u32> {
        children_of(self.master_pid())
            .into_iter()
            .filter(|p| {
                let c = cmdline(*p);
                c.contains("worker process") && !c.contains("shutting down")
            })
            .collect()
    }

    /// The error log so far.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    /// Replaces the `http {}` body and sends SIGHUP (`nginx -s reload`); waits until a new set
    /// of workers is running.
    pub fn reload_with(&mut self, conf: NginxConf) {
        self.conf = conf;
        Nginx::prepare(&self.dir, &self.conf, &self.ports);
        self.reload();
    }

    /// Replaces the configuration with one whose load must fail, sends SIGHUP and waits until
    /// the master logs the failure (an `[emerg]` line after the reload); the running workers stay.
    /// Returns the new lines of the error log. The configuration file keeps the failing text
    /// (nginx keeps running the old one); `reload_with` puts a good one back.
    pub fn reload_failing(&mut self, conf: NginxConf) -> String {
        let log_path = self.dir.join("error.log");
        let offset = std::fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0) as usize;
        std::fs::write(self.dir.join("nginx.conf"), conf.render(&self.dir, &self.ports)).expect("writing nginx.conf");
        let mut before = self.active_worker_pids();
        before.sort();
        self.proc.as_ref().expect("nginx running").signal(libc::SIGHUP);
        let new_lines =
            || std::fs::read(&log_path).map(|b| String::from_utf8_lossy(&b[offset.min(b.len())..]).into_owned()).unwrap_or_default();
        wait_until("the failed reload in the error log", Duration::from_secs(60), || new_lines().contains("[emerg]"));
        // The master may retry (bind() is tried 5 times, 500 ms apart): wait until its log has
        // been quiet for a second, then check nothing was replaced.
        let mut last = (new_lines().len(), std::time::Instant::now());
        while last.1.elapsed() < Duration::from_secs(1) {
            std::thread::sleep(Duration::from_millis(100));
            let n = new_lines().len();
            if n != last.0 {
                last = (n, std::time::Instant::now());
            }
        }
        let mut after = self.active_worker_pids();
        after.sort();
        assert_eq!(after, before, "a failed reload replaced the workers:\n{}", new_lines());
        new_lines()
    }

    /// SIGHUP to the master; waits until the new workers run (the old ones may still exit).
    pub fn reload(&mut self) {
        let before = self.worker_pids();
        self.proc.as_ref().expect("nginx running").signal(libc::SIGHUP);
        let want = self.conf.workers;
        wait_until("new nginx workers after reload", Duration::from_secs(30), || {
            self.active_worker_pids().iter().filter(|p| !before.contains(p)).count() >= want
        });
    }

    /// Graceful stop (SIGQUIT), SIGKILL of the group after `grace`. Returns whether it exited in time.
    pub fn quit(&mut self, grace: Duration) -> bool {
        let Some(mut p) = self.proc.take() else { return true };
        p.signal(libc::SIGQUIT);
        let exited = p.wait_exit(grace).is_some();
        p.stop_with(libc::SIGKILL, Duration::from_secs(1));
        exited
    }

    /// SIGKILL to master and workers.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Whether every PID in `pids` has exited.
    pub fn all_exited(pids: &[u32]) -> bool {
        pids.iter().all(|p| !alive(*p))
    }
}

impl Nginx {
    /// Lines of the error log where the master reports a worker killed by a crash signal
    /// (SIGSEGV, SIGABRT, SIGBUS, SIGFPE, SIGILL...): not SIGKILL/SIGTERM, which tests send.
    pub fn crashes(&self) -> Vec<String> {
        self.error_log()
            .lines()
            .filter(|l| {
                l.split("exited on signal ")
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next())
                    .and_then(|n| n.parse::<i32>().ok())
                    .is_some_and(|sig| sig != libc::SIGKILL && sig != libc::SIGTERM)
            })
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Nginx {
    /// Stops nginx; a test whose nginx had a crashing worker fails here even if its own
    /// assertions passed (the master respawns workers, which could hide a crash).
    fn drop(&mut self) {
        self.quit(Duration::from_secs(10));
        let crashes = self.crashes();
        if !crashes.is_empty() && !std::thread::panicking() {
            panic!("nginx workers crashed during the test:\n{}", crashes.join("\n"));
        }
    }
}
