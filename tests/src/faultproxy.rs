//! A fault-injecting TCP proxy to put between a client (nginx with the module) and a REAL
//! Consul agent, switched between [`Fault`] modes at run time.
//!
//! Each client connection carries one request: the proxy adds `Connection: close` to the request
//! it forwards, so Consul ends its answer by closing and every answer starts on a fresh
//! connection (the proxy never has to find where one answer ends and the next begins). The mode
//! in force when Consul's answer *arrives* decides what happens to it, so a blocking query
//! already waiting in Consul when the mode changes gets the fault too.
//!
//! Only [`Fault::Huge`] answers by itself (a synthetic header and a 300 MB body generated on the
//! fly): a fault, not Consul behaviour. Every other mode passes on Consul's own answer, cut,
//! delayed or with its `X-Consul-Index` rewritten.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// Size of the body [`Fault::Huge`] sends.
pub const HUGE_BODY: u64 = 300 << 20;

/// What the proxy does with the next answers from Consul.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything as is.
    Pass,
    /// Forward the header and half of the body, then nothing more, keeping both sockets open
    /// until the client closes.
    Stall,
    /// Forward the header and half of the body, then close the client's connection.
    Drop,
    /// Forward the answer (header included) one byte a second.
    Dribble,
    /// Answer with a valid HTTP header and a chunked body of [`HUGE_BODY`] bytes generated on
    /// the fly (never held in memory), instead of Consul's answer.
    Huge,
    /// Forward Consul's answer with its `X-Consul-Index` value replaced by this one.
    GarbageIndex(String),
}

#[derive(Default)]
struct Stats {
    /// Requests received from clients.
    requests: AtomicU64,
    /// Answers a fault mode altered.
    faulted: AtomicU64,
    /// Body bytes of the last huge answer the client took before it closed.
    huge_sent: AtomicU64,
}

/// A running proxy; stops (closing every connection) when dropped.
pub struct FaultProxy {
    port: u16,
    mode: Arc<Mutex<Fault>>,
    stats: Arc<Stats>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultProxy {
    /// A proxy on a free loopback port forwarding to `127.0.0.1:upstream_port`, in [`Fault::Pass`].
    pub fn start(upstream_port: u16) -> FaultProxy {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("fault proxy: bind 127.0.0.1:0");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let port = std_listener.local_addr().expect("local addr").port();
        let mode = Arc::new(Mutex::new(Fault::Pass));
        let stats = Arc::new(Stats::default());
        let (tx, rx) = oneshot::channel();
        let (m, s) = (mode.clone(), stats.clone());
        let thread = std::thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
                rt.block_on(async move {
                    let listener = TcpListener::from_std(std_listener).expect("listener");
                    let accept = async {
                        loop {
                            let Ok((client, _)) = listener.accept().await else { continue };
                            let (m, s) = (m.clone(), s.clone());
                            tokio::spawn(async move {
                                let _ = serve(client, upstream_port, m, s).await;
                            });
                        }
                    };
                    tokio::select! {
                        _ = accept => {}
                        _ = rx => {}
                    }
                });
                // Dropping the runtime drops every connection task and closes their sockets.
                rt.shutdown_timeout(Duration::from_millis(100));
            })
            .expect("fault proxy thread");
        FaultProxy { port, mode, stats, stop: Some(tx), thread: Some(thread) }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`, to put in an `upsync` line instead of Consul's address.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Switches the mode for the answers that arrive from now on.
    pub fn set(&self, fault: Fault) {
        *self.mode.lock().unwrap_or_else(|e| e.into_inner()) = fault;
    }

    /// Requests received so far.
    pub fn requests(&self) -> u64 {
        self.stats.requests.load(Ordering::Relaxed)
    }

    /// Answers altered by a fault mode so far.
    pub fn faulted(&self) -> u64 {
        self.stats.faulted.load(Ordering::Relaxed)
    }

    /// Body bytes of the last [`Fault::Huge`] answer that the client read before it closed.
    pub fn huge_sent(&self) -> u64 {
        self.stats.huge_sent.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads until the end of an HTTP head (`\r\n\r\n`); returns the head and what followed it.
/// `None` if the peer closed first.
async fn read_head(s: &mut TcpStream) -> std::io::Result<Option<(Vec<u8>, Vec<u8>)>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok(Some((buf, rest)));
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 1 << 20 {
            return Err(std::io::Error::other("HTTP head over 1 MiB"));
        }
    }
}

/// The value of header `name` (lowercase) in `head`, if present.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// `head` with every `name` header line removed and `extra` lines added before the blank line.
fn rewrite_head(head: &[u8], drop: &str, extra: &str) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let mut out = String::new();
    for line in text.trim_end_matches("\r\n").split("\r\n") {
        let name = line.split_once(':').map(|(k, _)| k.trim());
        if name.is_some_and(|n| n.eq_ignore_ascii_case(drop)) {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str(extra);
    out.push_str("\r\n");
    out.into_bytes()
}

async fn serve(mut client: TcpStream, upstream_port: u16, mode: Arc<Mutex<Fault>>, stats: Arc<Stats>) -> std::io::Result<()> {
    let Some((head, mut body)) = read_head(&mut client).await? else { return Ok(()) };
    stats.requests.fetch_add(1, Ordering::Relaxed);
    let text = String::from_utf8_lossy(&head).to_string();
    let length: usize = header(&text, "content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    while body.len() < length {
        let mut chunk = vec![0u8; length - body.len()];
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let mut consul = TcpStream::connect(("127.0.0.1", upstream_port)).await?;
    consul.write_all(&rewrite_head(&head, "connection", "Connection: close\r\n")).await?;
    consul.write_all(&body).await?;
    // Consul's whole answer: it closes the connection after it (Connection: close). Holding it
    // is fine for the list answers of a test; the huge answer is never Consul's.
    let Some((resp_head, mut resp_body)) = read_head(&mut consul).await? else { return Ok(()) };
    consul.read_to_end(&mut resp_body).await?;
    let fault = mode.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if fault != Fault::Pass {
        stats.faulted.fetch_add(1, Ordering::Relaxed);
    }
    let whole = [resp_head.clone(), resp_body.clone()].concat();
    // Half of the body (or of the whole answer when the body is too short to cut).
    let cut = if resp_body.len() >= 2 { resp_head.len() + resp_body.len() / 2 } else { whole.len() / 2 };
    match fault {
        Fault::Pass => client.write_all(&whole).await?,
        Fault::GarbageIndex(v) => {
            client.write_all(&rewrite_head(&resp_head, "x-consul-index", &format!("X-Consul-Index: {v}\r\n"))).await?;
            client.write_all(&resp_body).await?;
        }
        Fault::Stall => {
            client.write_all(&whole[..cut]).await?;
            // Keep the socket open, sending nothing, until the client gives up.
            let mut sink = [0u8; 1024];
            while client.read(&mut sink).await? > 0 {}
        }
        Fault::Drop => {
            client.write_all(&whole[..cut]).await?;
            // Dropping the stream closes the connection mid-answer.
        }
        Fault::Dribble => {
            for b in &whole {
                client.write_all(std::slice::from_ref(b)).await?;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        Fault::Huge => huge(&mut client, &stats).await?,
    }
    let _ = client.shutdown().await;
    Ok(())
}

/// A valid chunked answer of [`HUGE_BODY`] bytes, one 64 KiB buffer reused for every chunk.
async fn huge(client: &mut TcpStream, stats: &Stats) -> std::io::Result<()> {
    stats.huge_sent.store(0, Ordering::Relaxed);
    client
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Consul-Index: 4242\r\nX-Consul-Knownleader: true\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await?;
    let entry = br#"{"Key":"upstreams/app/10.0.0.1:80","CreateIndex":1,"ModifyIndex":1,"LockIndex":0,"Flags":0,"Value":null},"#;
    let mut chunk = Vec::with_capacity(65536);
    chunk.push(b'[');
    while chunk.len() + entry.len() <= 65536 {
        chunk.extend_from_slice(entry);
    }
    chunk.resize(65536, b' ');
    let head = format!("{:x}\r\n", chunk.len());
    let mut sent = 0u64;
    while sent < HUGE_BODY {
        client.write_all(head.as_bytes()).await?;
        client.write_all(&chunk).await?;
        client.write_all(b"\r\n").await?;
        sent += chunk.len() as u64;
        stats.huge_sent.store(sent, Ordering::Relaxed);
    }
    client.write_all(b"0\r\n\r\n").await
}
