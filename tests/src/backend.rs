//! Small HTTP/1.1 backends (hyper) that answer with their own name, so a test can see which
//! backend served a request.
//!
//! - `GET /anything` → `200`, body = the backend's name.
//! - `GET /slow?ms=N` → the same after sleeping N ms (for requests in flight during a change).
//! - `GET /status/N` → status N, body = name.
//!
//! Each backend counts the requests it served and the TCP connections it accepted (keepalive
//! tests look at the latter).
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

#[derive(Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub connections: AtomicU64,
}

/// A running backend; stops when dropped.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub counters: Arc<Counters>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Backend {
    /// Starts a backend named `name` on a free loopback port.
    pub fn start(name: &str) -> Backend {
        Backend::start_on(name, "127.0.0.1:0".parse().unwrap())
    }

    /// Starts a backend on `addr` (port 0 picks a free one).
    pub fn start_on(name: &str, addr: SocketAddr) -> Backend {
        let std_listener = std::net::TcpListener::bind(addr).unwrap_or_else(|e| panic!("backend {name} bind {addr}: {e}"));
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("local addr");
        let counters = Arc::new(Counters::default());
        let (tx, rx) = oneshot::channel();
        let (n, c) = (name.to_string(), counters.clone());
        let thread = std::thread::Builder::new()
            .name(format!("backend-{name}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
                rt.block_on(serve(std_listener, n, c, rx));
            })
            .expect("backend thread");
        Backend { name: name.to_string(), addr, counters, stop: Some(tx), thread: Some(thread) }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `127.0.0.1:PORT`.
    pub fn host_port(&self) -> String {
        self.addr.to_string()
    }

    pub fn requests(&self) -> u64 {
        self.counters.requests.load(Ordering::Relaxed)
    }

    pub fn connections(&self) -> u64 {
        self.counters.connections.load(Ordering::Relaxed)
    }

    /// Stops accepting and closes the listener (connections in progress finish).
    pub fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Serves until `stop` fires. Public so the `upsync-backend` binary (demo, benchmarks) shares it.
pub async fn serve(listener: std::net::TcpListener, name: String, counters: Arc<Counters>, mut stop: oneshot::Receiver<()>) {
    let listener = TcpListener::from_std(listener).expect("tokio listener");
    let name: Arc<str> = name.into();
    loop {
        tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                counters.connections.fetch_add(1, Ordering::Relaxed);
                let (name, counters) = (name.clone(), counters.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(req, name.clone(), counters.clone()));
                    let _ = http1::Builder::new().keep_alive(true).serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        }
    }
}

async fn handle(req: Request<Incoming>, name: Arc<str>, counters: Arc<Counters>) -> Result<Response<Full<Bytes>>, Infallible> {
    counters.requests.fetch_add(1, Ordering::Relaxed);
    let path = req.uri().path();
    let mut status = StatusCode::OK;
    if path == "/slow" {
        let ms =
            req.uri().query().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("ms="))).and_then(|v| v.parse().ok()).unwrap_or(1000);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    } else if let Some(code) = path.strip_prefix("/status/") {
        status = code.parse().ok().and_then(|c| StatusCode::from_u16(c).ok()).unwrap_or(StatusCode::BAD_REQUEST);
    }
    let mut resp = Response::new(Full::new(Bytes::from(name.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert("x-backend", name.parse().unwrap_or_else(|_| "invalid".parse().unwrap()));
    Ok(resp)
}
