//! Loopback ports and small HTTP helpers.
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Mutex;
use std::time::Duration;

/// Ports handed out by this process, so two harness objects never get the same one even when
/// the OS would return a just-released port again.
static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());

/// A port that is free on 127.0.0.1 for both TCP and UDP right now (Consul's DNS and serf use
/// both). There is a window between this call and the process binding it; the starters retry
/// with fresh ports when a bind fails.
pub fn free_port() -> u16 {
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..200 {
        let port =
            TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("binding 127.0.0.1:0 for a free port");
        if given.contains(&port) || UdpSocket::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        given.push(port);
        return port;
    }
    panic!("no free loopback port found after 200 tries");
}

/// Whether something accepts TCP connections on 127.0.0.1:port.
pub fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_millis(200)).is_ok()
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(2)).timeout(Duration::from_secs(30)).build()
}

/// The status and body of `GET url`; any HTTP status is a response, only transport errors are `Err`.
pub fn http_get(url: &str) -> anyhow::Result<(u16, String)> {
    http_request("GET", url, &[], None)
}

/// `GET url` that gives up after `timeout` (for servers that may not answer).
pub fn http_request_timeout(url: &str, timeout: Duration) -> anyhow::Result<(u16, String)> {
    match ureq::AgentBuilder::new().timeout(timeout).build().get(url).call() {
        Ok(resp) => {
            let status = resp.status();
            Ok((status, resp.into_string()?))
        }
        Err(ureq::Error::Status(status, resp)) => Ok((status, resp.into_string().unwrap_or_default())),
        Err(e) => Err(anyhow::anyhow!("GET {url}: {e}")),
    }
}

/// One HTTP request; returns the status and body. Non-2xx statuses are returned, not errors.
pub fn http_request(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> anyhow::Result<(u16, String)> {
    let mut req = agent().request(method, url);
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let result = match body {
        Some(b) => req.send_bytes(b),
        None => req.call(),
    };
    match result {
        Ok(resp) => {
            let status = resp.status();
            Ok((status, resp.into_string()?))
        }
        Err(ureq::Error::Status(status, resp)) => Ok((status, resp.into_string().unwrap_or_default())),
        Err(e) => Err(anyhow::anyhow!("{method} {url}: {e}")),
    }
}

/// Established TCP connections that processes `pids` hold to `port` on any address (read
/// from `/proc`: each process's socket inodes matched against `/proc/net/tcp` and `tcp6`).
pub fn connections_to(pids: &[u32], port: u16) -> usize {
    let mut inodes = std::collections::HashSet::new();
    for pid in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let t = target.to_string_lossy();
                if let Some(inode) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                    inodes.insert(inode.to_string());
                }
            }
        }
    }
    let mut n = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for line in text.lines().skip(1) {
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "01" {
                continue;
            }
            let remote_port = f[2].rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
            if remote_port == Some(port) && inodes.contains(f[9]) {
                n += 1;
            }
        }
    }
    n
}
