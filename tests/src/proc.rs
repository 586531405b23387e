//! Child processes owned by a test: started in their own process group, stopped by PID/PGID
//! only (never by name), and killed when the guard is dropped, also during a panic.
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running child process and the group it leads.
pub struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr appended to `log`, in a new process group, with
    /// `PR_SET_PDEATHSIG(SIGKILL)` so it cannot outlive the test process. Called inside
    /// [`crate::hosts::Host::run`], it starts the process in that host's network namespace.
    pub fn spawn(name: &str, cmd: Command, log: &Path) -> anyhow::Result<Proc> {
        let in_netns = crate::hosts::in_current_netns(&cmd);
        let mut cmd = in_netns.unwrap_or(cmd);
        let out = File::options().create(true).append(true).open(log)?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err).process_group(0);
        // SAFETY: prctl and getppid are async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let program = format!("{:?}", cmd.get_program());
        let child = if crate::hosts::current_netns().is_some() { crate::hosts::spawn_from_long_lived_thread(cmd) } else { cmd.spawn() };
        let child = child.map_err(|e| anyhow::anyhow!("starting {name} ({program}): {e}"))?;
        Ok(Proc { name: name.to_string(), child: Some(child), log: log.to_path_buf() })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// The file its stdout/stderr go to.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The log's contents so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process is still running (not exited, not a zombie).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Exit status if it has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Sends `sig` to the process only.
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on a PID we spawned and have not reaped yet.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// Sends `sig` to the whole process group this process leads (e.g. nginx master + workers).
    pub fn signal_group(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: the group was created for this child by process_group(0); its id is the PID.
            unsafe { libc::kill(-(c.id() as i32), sig) };
        }
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(st) = self.try_wait() {
                return Some(st);
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `sig`, waits up to `grace` for the exit, then kills the whole group. Idempotent.
    pub fn stop_with(&mut self, sig: i32, grace: Duration) {
        if self.child.is_none() {
            return;
        }
        if self.try_wait().is_none() {
            self.signal(sig);
            if self.wait_exit(grace).is_none() {
                eprintln!("{} (pid {}) did not exit within {grace:?} of signal {sig}; killing its group", self.name, self.pid());
            }
        }
        // Whatever is left of the group (e.g. nginx workers orphaned by a killed master).
        self.signal_group(libc::SIGKILL);
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGKILL to the group, no grace.
    pub fn kill(&mut self) {
        self.signal_group(libc::SIGKILL);
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop_with(libc::SIGTERM, Duration::from_secs(5));
    }
}

/// PIDs of the direct children of `pid` (from /proc), e.g. an nginx master's workers.
pub fn children_of(pid: u32) -> Vec<u32> {
    let path = format!("/proc/{pid}/task/{pid}/children");
    std::fs::read_to_string(path).unwrap_or_default().split_whitespace().filter_map(|s| s.parse().ok()).collect()
}

/// `pid` and all its descendants (children, their children...), from /proc: e.g. an nginx
/// master, its workers and the module's poller processes the leader workers forked.
pub fn tree_of(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let kids = children_of(all[i]);
        all.extend(kids);
        i += 1;
    }
    all
}

/// The command line of a process, or "" if it is gone.
pub fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " ").trim().to_string())
        .unwrap_or_default()
}

/// Whether `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s.rsplit(')').next().map(|r| !r.trim_start().starts_with('Z')).unwrap_or(false),
        Err(_) => false,
    }
}

/// Resident set size of `pid` in KiB (VmRSS), if known.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS")
}

/// A KiB field of /proc/PID/status (`VmRSS`, `RssAnon`: private memory, `RssShmem`: pages of
/// shared memory zones this process touched).
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Number of threads of `pid`.
pub fn thread_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.count()).unwrap_or(0)
}
