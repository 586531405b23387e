//! Several hosts on one machine: one network namespace per host, each with a veth pair whose
//! other end is a port of a bridge that lives in a namespace of its own (the "switch").
//!
//! ```text
//!   ns <prefix>-s1 (eth0 10.213.0.11) ──┐
//!   ns <prefix>-a1 (eth0 10.213.0.21) ──┤  ns <prefix>-switch: bridge br0, ports p-s1, p-a1, ...
//!   ns <prefix>-ng (eth0 10.213.0.30) ──┘
//! ```
//!
//! Nothing of it is in the machine's own namespace: no interface, no address, no route, so the
//! hosts can reach each other and nothing else, and the machine's network never sees their
//! traffic (the address range is private and exists only inside the topology). A host is cut
//! off by taking its bridge port down ([`Topology::cut`]): its packets go nowhere, as with a
//! pulled cable (no reset, no ICMP), until [`Topology::heal`] puts the port up again.
//!
//! The test reaches a host by entering its namespace: [`Host::run`] runs a closure on a thread
//! that joined the namespace (`setns(2)`), so the harness's helpers work there unchanged
//! (`127.0.0.1` is the host's own loopback). Processes the harness starts inside such a
//! closure ([`crate::proc::Proc::spawn`]) are started with `ip netns exec`, forked by a
//! long-lived thread of the test process (a child's `PR_SET_PDEATHSIG` fires when
//! the *thread* that forked it ends, not the process). Commands run to completion there
//! (`dig`, `wrk`) simply inherit the namespace.
//!
//! Namespace names carry the test process's PID (`ust-PID-N-...`); every namespace is deleted
//! when the [`Topology`] is dropped, also during a panic, and namespaces left by a test process
//! that no longer exists (killed with SIGKILL) are deleted by the next topology.
use std::cell::RefCell;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};

use nix::sched::{setns, CloneFlags};

/// The private range of every topology's hosts (each topology is an island: two topologies
/// may use the same addresses).
pub const SUBNET: [u8; 3] = [10, 213, 0];

const NETNS_DIR: &str = "/run/netns";
const NAME_PREFIX: &str = "ust-";

/// One host of a [`Topology`]: a network namespace and its address.
#[derive(Clone, Debug)]
pub struct Host {
    /// Short name (`s1`, `a1`, `ng`), also the name of its bridge port (`p-NAME`).
    pub name: String,
    /// Its network namespace (`ip netns` name).
    pub netns: String,
    /// The address of its `eth0`.
    pub ip: Ipv4Addr,
}

impl Host {
    /// Runs `f` on a thread inside this host's network namespace and returns its result.
    /// Processes the harness starts in `f` run in the namespace too (see the module's docs).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let fd = open_netns(&self.netns);
        std::thread::scope(|s| {
            std::thread::Builder::new()
                .name(format!("in-{}", self.name))
                .spawn_scoped(s, move || {
                    setns(&fd, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("entering network namespace {}: {e}", self.netns));
                    CURRENT.with(|c| *c.borrow_mut() = Some(self.netns.clone()));
                    f()
                })
                .expect("a thread for the host")
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Runs `f` on a new, detached thread inside this host's network namespace (for load that
    /// runs while the test goes on).
    pub fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
        let host = self.clone();
        std::thread::spawn(move || host.run(f))
    }

    /// `IP:PORT` on this host.
    pub fn addr(&self, port: u16) -> String {
        format!("{}:{port}", self.ip)
    }
}

thread_local! {
    /// The namespace this thread entered through [`Host::run`], if any.
    static CURRENT: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// The network namespace the calling thread entered through [`Host::run`], if any.
pub fn current_netns() -> Option<String> {
    CURRENT.with(|c| c.borrow().clone())
}

fn open_netns(name: &str) -> OwnedFd {
    let path = PathBuf::from(NETNS_DIR).join(name);
    std::fs::File::open(&path).unwrap_or_else(|e| panic!("opening network namespace {}: {e}", path.display())).into()
}

/// A job for the spawner thread: a command to fork and its answer channel.
type SpawnJob = (Command, mpsc::Sender<std::io::Result<std::process::Child>>);

/// Forks `cmd` (whose pre-exec hooks are set) on the process's spawner thread, which lives as
/// long as the test process: the child's `PR_SET_PDEATHSIG` then fires only when the test
/// process ends, not when the short-lived thread of a [`Host::run`] does.
pub(crate) fn spawn_from_long_lived_thread(cmd: Command) -> std::io::Result<std::process::Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("netns-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("the spawner thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    tx.lock().unwrap_or_else(|e| e.into_inner()).send((cmd, reply_tx)).expect("the spawner thread is running");
    reply_rx.recv().expect("the spawner thread answers")
}

/// `cmd` run in the network namespace the calling thread entered (if any), as `ip netns exec
/// NAME PROGRAM ARGS...` (which execs the program in place: the PID is the program's);
/// `None` when the thread is in none.
pub(crate) fn in_current_netns(cmd: &Command) -> Option<Command> {
    let name = current_netns()?;
    let mut wrapped = Command::new("ip");
    wrapped.args(["netns", "exec", &name]).arg(cmd.get_program()).args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => wrapped.env(k, v),
            None => wrapped.env_remove(k),
        };
    }
    if let Some(d) = cmd.get_current_dir() {
        wrapped.current_dir(d);
    }
    Some(wrapped)
}

/// Network namespaces joined by a bridge, deleted on drop.
pub struct Topology {
    prefix: String,
    switch: String,
    hosts: Vec<Host>,
}

impl Topology {
    /// An empty switch (a bridge in a namespace of its own). Deletes namespaces left by test
    /// processes that no longer run.
    pub fn new() -> Topology {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        remove_stale_namespaces();
        let prefix = format!("{NAME_PREFIX}{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        let switch = format!("{prefix}-switch");
        let t = Topology { prefix, switch: switch.clone(), hosts: Vec::new() };
        ip(&["netns", "add", &switch]);
        ip(&["-n", &switch, "link", "set", "lo", "up"]);
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &switch, "link", "set", "br0", "up"]);
        t
    }

    /// A new host `name` (at most 8 characters) with address `10.213.0.<octet>`, linked to the
    /// switch.
    pub fn add_host(&mut self, name: &str, octet: u8) -> Host {
        assert!(name.len() <= 8 && !name.is_empty(), "host name {name:?}: 1 to 8 characters");
        let netns = format!("{}-{name}", self.prefix);
        let host = Host { name: name.to_string(), netns: netns.clone(), ip: Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], octet) };
        // Recorded first: a failure below still deletes what was made.
        self.hosts.push(host.clone());
        ip(&["netns", "add", &netns]);
        ip(&["-n", &netns, "link", "set", "lo", "up"]);
        let port = format!("p-{name}");
        // Both ends are created directly in their namespaces: the machine's own never sees them.
        ip(&["-n", &self.switch, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &netns]);
        ip(&["-n", &self.switch, "link", "set", &port, "master", "br0", "up"]);
        ip(&["-n", &netns, "addr", "add", &format!("{}/24", host.ip), "dev", "eth0"]);
        ip(&["-n", &netns, "link", "set", "eth0", "up"]);
        host
    }

    /// Cuts `host` off the network: its bridge port goes down, every packet to or from it is
    /// lost (no reset, no ICMP: a pulled cable).
    pub fn cut(&self, host: &Host) {
        ip(&["-n", &self.switch, "link", "set", &format!("p-{}", host.name), "down"]);
    }

    /// Puts `host` back on the network.
    pub fn heal(&self, host: &Host) {
        ip(&["-n", &self.switch, "link", "set", &format!("p-{}", host.name), "up"]);
    }
}

impl Default for Topology {
    fn default() -> Self {
        Topology::new()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = Command::new("ip").args(["netns", "delete", &h.netns]).status();
        }
        let _ = Command::new("ip").args(["netns", "delete", &self.switch]).status();
    }
}

/// Runs `ip ARGS`, panicking with its output when it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap_or_else(|e| panic!("running ip {args:?} (iproute2): {e}"));
    assert!(out.status.success(), "ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
}

/// Deletes `ust-PID-...` namespaces whose test process is gone.
fn remove_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(NAME_PREFIX).and_then(|r| r.split('-').next()).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !crate::proc::alive(pid) {
            let _ = Command::new("ip").args(["netns", "delete", &name]).status();
        }
    }
}

/// `IP:PORT` of the peers `pid` holds established TCP connections to, read from the process's
/// own network namespace (`/proc/PID/net/tcp`), for connections owned by `pid` itself.
pub fn tcp_peers(pid: u32) -> Vec<String> {
    let mut inodes = std::collections::HashSet::new();
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(t) = std::fs::read_link(fd.path()) {
                if let Some(i) = t.to_string_lossy().strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                    inodes.insert(i.to_string());
                }
            }
        }
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "01" || !inodes.contains(f[9]) {
                return None;
            }
            let (ip, port) = f[2].split_once(':')?;
            let ip = u32::from_str_radix(ip, 16).ok()?;
            let port = u16::from_str_radix(port, 16).ok()?;
            // /proc/net/tcp prints the address as a native-endian u32 of network-order bytes.
            Some(format!("{}:{port}", Ipv4Addr::from(ip.to_le_bytes())))
        })
        .collect()
}
