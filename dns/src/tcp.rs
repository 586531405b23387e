//! DNS over TCP (RFC 7766, 2-byte length prefix), and the accept loop shared with the HTTP
//! endpoint.
//!
//! - Connections are bounded (`max_tcp_connections`, all listen addresses together). At the
//!   bound, a new connection makes room by closing the connection idle the longest (RFC 7766
//!   6.2.3 lets a server close idle connections under pressure); when every connection is in
//!   the middle of a query, the new one is closed instead. A flood of idle connections thus
//!   never locks out a new client, and never touches UDP service (own threads).
//! - A connection is closed when no complete query arrives within `tcp_idle_timeout` (a
//!   client sending one byte at a time gets no longer than that per query), and when an answer
//!   cannot be written within it.
//! - Queries of one connection are answered in order, one at a time (a connection cannot make
//!   the server work on more than one query at once).
//! - `accept` failing for lack of resources (EMFILE, ENFILE, ENOBUFS, ENOMEM) backs off
//!   (10 ms doubling to 1 s) instead of spinning, logs one warning per burst and one line when
//!   accepting works again.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

use crate::metrics::Shard;
use crate::server::Responder;

/// Longest pause between two failed accepts.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
const FIRST_BACKOFF: Duration = Duration::from_millis(10);

/// The state of one accept loop between failures.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: u64,
    delay: Duration,
}

/// Whether `e` says the process or the system is out of something an accept needs.
fn is_resource_error(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error().map(Errno::from_raw), Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM))
}

/// Accepts the next connection on `listener`. Errors of one connection (aborted before it was
/// accepted) are skipped; resource errors (EMFILE...) and unknown ones pause the loop, longer
/// each time, with one warning per burst: a full descriptor table must not turn the accept
/// loop into a busy loop.
pub async fn accept(listener: &TcpListener, what: &str, shard: &Shard, backoff: &mut Backoff) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => {
                if backoff.failures > 0 {
                    tracing::info!(failed_accepts = backoff.failures, "{what}: accepting connections again");
                    *backoff = Backoff::default();
                }
                return accepted;
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::Interrupted) => {
                tracing::debug!("{what}: accept: {e}");
            }
            Err(e) => {
                let resources = is_resource_error(&e);
                if resources {
                    shard.accept_error();
                }
                if backoff.failures == 0 {
                    let hint = if resources {
                        "; raise the open-file limit (LimitNOFILE, ulimit -n) or lower [dns] max_tcp_connections"
                    } else {
                        ""
                    };
                    tracing::warn!("{what}: cannot accept connections: {e}; retrying with a growing pause (up to {MAX_BACKOFF:?}){hint}");
                }
                backoff.failures += 1;
                backoff.delay = (backoff.delay * 2).clamp(FIRST_BACKOFF, MAX_BACKOFF);
                tokio::time::sleep(backoff.delay).await;
            }
        }
    }
}

/// One open connection, as the others see it.
struct Conn {
    /// Milliseconds since `Conns::epoch` of the last answer (or the accept).
    last_active_ms: AtomicU64,
    /// Between the first byte of a query and its answer written.
    busy: AtomicBool,
    /// Told to close (shed for a new connection).
    shed: Notify,
}

/// The open connections of all listeners.
struct Conns {
    max: usize,
    epoch: Instant,
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Conn>>>,
}

impl Conns {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Registers a new connection, shedding the longest idle one at the bound; `None` when
    /// every open connection is busy.
    fn admit(&self, shard: &Shard) -> Option<(u64, Arc<Conn>)> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.len() >= self.max {
            let idlest = open
                .iter()
                .filter(|(_, c)| !c.busy.load(Ordering::Relaxed))
                .min_by_key(|(_, c)| c.last_active_ms.load(Ordering::Relaxed))
                .map(|(&id, _)| id)?;
            if let Some(c) = open.remove(&idlest) {
                c.shed.notify_one();
                shard.tcp_shed();
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn { last_active_ms: AtomicU64::new(self.now_ms()), busy: AtomicBool::new(false), shed: Notify::new() });
        open.insert(id, conn.clone());
        Some((id, conn))
    }

    fn remove(&self, id: u64) {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    }

    fn len(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// The running TCP listeners and their connections.
pub struct TcpServer {
    stop: watch::Sender<bool>,
    conns: Arc<Conns>,
    listeners: Vec<tokio::task::JoinHandle<()>>,
}

impl TcpServer {
    /// Serves DNS over TCP on `listeners` until [`TcpServer::shutdown`].
    pub fn start(listeners: Vec<TcpListener>, responder: Arc<Responder>, max_connections: usize, idle_timeout: Duration) -> TcpServer {
        let (stop, _) = watch::channel(false);
        let conns = Arc::new(Conns {
            max: max_connections.max(1),
            epoch: Instant::now(),
            next_id: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
        });
        let listeners = listeners
            .into_iter()
            .map(|l| tokio::spawn(accept_loop(l, responder.clone(), conns.clone(), stop.subscribe(), idle_timeout)))
            .collect();
        TcpServer { stop, conns, listeners }
    }

    /// Stops accepting; connections finish the query in hand and close. Waits up to `grace`;
    /// whether every connection closed in time.
    pub async fn shutdown(self, grace: Duration) -> bool {
        let _ = self.stop.send(true);
        for l in &self.listeners {
            l.abort();
        }
        let deadline = Instant::now() + grace;
        while self.conns.len() > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }
}

async fn accept_loop(listener: TcpListener, responder: Arc<Responder>, conns: Arc<Conns>, stop: watch::Receiver<bool>, idle: Duration) {
    let shard = responder.metrics().shared.clone();
    let what = format!("DNS over TCP on {}", listener.local_addr().map_or("?".to_string(), |a| a.to_string()));
    let mut backoff = Backoff::default();
    loop {
        let (stream, src) = accept(&listener, &what, &shard, &mut backoff).await;
        let Some((id, conn)) = conns.admit(&shard) else {
            tracing::debug!(%src, "TCP: every connection is busy; closing the new one");
            continue;
        };
        responder.metrics().tcp_connections.set(conns.len() as i64);
        let _ = stream.set_nodelay(true);
        let (responder, conns, stop) = (responder.clone(), conns.clone(), stop.clone());
        tokio::spawn(async move {
            serve(stream, src, &responder, &conn, &conns, stop, idle).await;
            conns.remove(id);
            responder.metrics().tcp_connections.set(conns.len() as i64);
        });
    }
}

/// Reads the rest of the 2-byte length prefix (its first byte is `first`) and the message.
async fn read_message(stream: &mut TcpStream, first: u8, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let len = usize::from(u16::from_be_bytes([first, stream.read_u8().await?]));
    buf.resize(len, 0);
    stream.read_exact(buf).await?;
    Ok(())
}

async fn serve(
    mut stream: TcpStream,
    src: SocketAddr,
    responder: &Responder,
    conn: &Conn,
    conns: &Conns,
    mut stop: watch::Receiver<bool>,
    idle: Duration,
) {
    let mut buf = Vec::with_capacity(512);
    let mut out = Vec::with_capacity(512);
    loop {
        if *stop.borrow() {
            return;
        }
        // Only the wait for the first byte may be cut short by shedding or shutdown: a query
        // under way is answered. (`readable()` is not used here: it may report readiness for a
        // connection that has sent nothing.)
        let first = tokio::select! {
            r = stream.read_u8() => match r {
                Ok(b) => b,
                Err(e) => {
                    if e.kind() != std::io::ErrorKind::UnexpectedEof {
                        tracing::debug!(%src, "TCP: {e}");
                    }
                    return;
                }
            },
            _ = conn.shed.notified() => {
                tracing::debug!(%src, "TCP: closing an idle connection for a new one");
                return;
            }
            _ = stop.changed() => return,
            _ = tokio::time::sleep(idle) => {
                tracing::debug!(%src, "TCP: idle for {idle:?}; closing");
                return;
            }
        };
        conn.busy.store(true, Ordering::Relaxed);
        match tokio::time::timeout(idle, read_message(&mut stream, first, &mut buf)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(%src, "TCP: {e}");
                return;
            }
            Err(_) => {
                tracing::debug!(%src, "TCP: no complete query within {idle:?}; closing");
                return;
            }
        }
        if !responder.handle_tcp(&buf, src, &mut out).await {
            // Not a query (a response, or shorter than a header): nothing to answer.
            conn.busy.store(false, Ordering::Relaxed);
            continue;
        }
        let len = (out.len() as u16).to_be_bytes();
        let write = async {
            stream.write_all(&len).await?;
            stream.write_all(&out).await
        };
        match tokio::time::timeout(idle, write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(%src, "TCP: writing an answer: {e}");
                return;
            }
            Err(_) => {
                tracing::debug!(%src, "TCP: the answer could not be written within {idle:?}; closing");
                return;
            }
        }
        conn.last_active_ms.store(conns.now_ms(), Ordering::Relaxed);
        conn.busy.store(false, Ordering::Relaxed);
    }
}
