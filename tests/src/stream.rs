//! Helpers for tests of the stream module (`ngx_stream_upsync_module`): stream{} bodies, the
//! text `upstream_show` writes to a client that connects, a UDP backend that answers with its
//! name, and a raw HTTP/1.1 keepalive connection through a TCP proxy.
//!
//! TCP upstreams are tested with the HTTP [`crate::backend::Backend`]s: nginx's stream proxy
//! carries the bytes, and the answer's body names the backend behind the connection.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::wait::wait_for;

/// A stream{} body with one synced TCP upstream `name` watching `/v1/kv/upstreams/<name>` on
/// `consul`, proxied on `{{port}}`, and `upstream_show` on `{{port1}}`. `params` go on the upsync
/// line (default `upsync_interval=10ms`), `lines` into the upstream block.
pub fn stream_block(name: &str, consul: &str, params: &str, lines: &str) -> String {
    format!(
        "{}
        server {{ listen 127.0.0.1:{{{{port}}}}; proxy_pass {name}; proxy_connect_timeout 2s; }}
        server {{ listen 127.0.0.1:{{{{port1}}}}; upstream_show; }}",
        crate::upsync::upstream_block(name, consul, params, lines)
    )
}

/// What the stream `upstream_show` on `port` writes (read until nginx closes the connection).
pub fn stream_show(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| panic!("connecting to upstream_show on {port}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap_or_else(|e| panic!("reading upstream_show on {port}: {e}"));
    out
}

/// The `server ...;` lines listed for `upstream` in a stream `upstream_show` text, trimmed.
pub fn stream_show_lines(text: &str, upstream: &str) -> Vec<String> {
    let head = format!("Upstream name: {upstream};");
    let mut lines = text.lines().skip_while(|l| !l.starts_with(&head));
    if lines.next().is_none() {
        return Vec::new();
    }
    lines.take_while(|l| l.starts_with("        server ")).map(|l| l.trim().to_string()).collect()
}

/// The addresses listed for `upstream` (sorted).
pub fn stream_servers(port: u16, upstream: &str) -> Vec<String> {
    let mut v: Vec<String> =
        stream_show_lines(&stream_show(port), upstream).iter().filter_map(|l| l.split_whitespace().nth(1).map(str::to_string)).collect();
    for a in &mut v {
        if let Some(s) = a.strip_suffix(';') {
            *a = s.to_string();
        }
    }
    v.sort();
    v
}

/// Waits until the stream `upstream_show` on `port` lists exactly `expected` for `upstream`.
pub fn wait_stream_servers(port: u16, upstream: &str, expected: &[&str]) {
    let mut want: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    want.sort();
    wait_for(&format!("stream upstream {upstream} to list {want:?}"), Duration::from_secs(20), || {
        (stream_servers(port, upstream) == want).then_some(())
    });
}

/// Waits until the line of server `addr` of `upstream` contains `part` (e.g. `weight=3`, `down`).
pub fn wait_stream_server_line(port: u16, upstream: &str, addr: &str, part: &str) {
    let prefix = format!("server {addr} ");
    wait_for(&format!("stream upstream {upstream}: {addr} with {part}"), Duration::from_secs(20), || {
        stream_show_lines(&stream_show(port), upstream).iter().any(|l| l.starts_with(&prefix) && l.contains(part)).then_some(())
    });
}

/// A UDP server on a free loopback port that answers every datagram with its name. Stops when
/// dropped.
pub struct UdpBackend {
    pub name: String,
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UdpBackend {
    pub fn start(name: &str) -> UdpBackend {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("UDP backend {name}: {e}"));
        sock.set_read_timeout(Some(Duration::from_millis(50))).expect("read timeout");
        let addr = sock.local_addr().expect("local addr");
        let stop = Arc::new(AtomicBool::new(false));
        let (n, s) = (name.to_string(), stop.clone());
        let thread = std::thread::Builder::new()
            .name(format!("udp-backend-{name}"))
            .spawn(move || {
                let mut buf = [0u8; 2048];
                while !s.load(Ordering::Relaxed) {
                    if let Ok((_, from)) = sock.recv_from(&mut buf) {
                        let _ = sock.send_to(n.as_bytes(), from);
                    }
                }
            })
            .expect("UDP backend thread");
        UdpBackend { name: name.to_string(), addr, stop, thread: Some(thread) }
    }

    pub fn host_port(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for UdpBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends one datagram from a new socket to 127.0.0.1:`port` and returns the answer (None: no
/// answer within 2 s).
pub fn udp_ask(port: u16) -> Option<String> {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("UDP client socket");
    sock.set_read_timeout(Some(Duration::from_secs(2))).expect("read timeout");
    sock.send_to(b"who", ("127.0.0.1", port)).expect("UDP send");
    let mut buf = [0u8; 2048];
    sock.recv_from(&mut buf).ok().map(|(n, _)| String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// A client connection through a TCP proxy to an HTTP backend, kept open across requests.
pub struct KeptConnection {
    reader: BufReader<TcpStream>,
}

impl KeptConnection {
    pub fn open(port: u16) -> KeptConnection {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| panic!("connecting to 127.0.0.1:{port}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
        KeptConnection { reader: BufReader::new(s) }
    }

    /// `GET /` on this connection; the body (the backend's name).
    pub fn get(&mut self) -> anyhow::Result<String> {
        self.reader.get_mut().write_all(b"GET / HTTP/1.1\r\nHost: upsync\r\n\r\n")?;
        let mut len = None;
        let mut line = String::new();
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                anyhow::bail!("the connection was closed");
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse::<usize>().ok();
                }
            }
        }
        let mut body = vec![0u8; len.ok_or_else(|| anyhow::anyhow!("no content-length"))?];
        self.reader.read_exact(&mut body)?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
}
