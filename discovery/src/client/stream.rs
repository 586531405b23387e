//! Answers read as they arrive, for etcd (see [`crate::etcd`]): its v3 watch (`POST /v3/watch`)
//! streams one JSON message per change for as long as the connection lives, and its v2 long poll
//! (`GET /v2/keys/...?wait=true`) holds the answer until a change, with no limit of its own.
//! [`Client::request`] reads a whole body within the request timeout, which fits neither.
//!
//! Same connections as [`Client::request`] (pool, TLS, TCP keepalive and user timeout, address
//! failover, `max_connections`), and the same rule: the connection is driven by the caller's
//! future, nothing is spawned, dropping the [`Stream`] closes its connection at once. The status
//! line and headers must arrive within the request timeout; the body is the caller's to bound
//! in time (wrap [`Stream::chunk`] in a timeout) and size ([`Stream::read_to_end`] has a limit).
use super::*;

use hyper::body::{Body as _, Frame, Incoming};
use hyper::header::{HeaderName, CONNECTION, CONTENT_LENGTH};

/// An answer whose body is read as it arrives.
pub struct Stream {
    client: Client,
    /// Index of the address that answered.
    index: usize,
    /// `None` once the body has ended or failed.
    conn: Option<Conn>,
    body: Incoming,
    status: u16,
    headers: hyper::HeaderMap,
    address: ConsulAddr,
    method: String,
    path: String,
    keep_alive: bool,
    driving: Driving,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("address", &self.address.to_string())
            .field("path", &self.path)
            .field("status", &self.status)
            .finish()
    }
}

impl Client {
    /// Sends a request and returns once the status line and headers have arrived, whatever the
    /// status: within the request timeout, plus `wait` for a server that holds the head of its
    /// answer until it has something to say (a long poll). The addresses are tried from the
    /// current one on, moving to the next when one cannot be reached or breaks before
    /// answering. For idempotent requests only: a pooled connection that turns out to be closed
    /// is replaced and the request sent again. `headers` are added to the request.
    pub async fn stream(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        headers: &[(&str, &str)],
        wait: Duration,
    ) -> Result<Stream, Error> {
        if !path.starts_with('/') {
            return Err(Error::Config(format!("request path `{path}` must start with `/`")));
        }
        let body = body.unwrap_or_default();
        let n = self.inner.cfg.addresses.len();
        let start = self.inner.current.load(Ordering::Relaxed) % n;
        let mut k = 0;
        loop {
            let i = (start + k) % n;
            match self.open_stream(i, &method, path, &body, headers, wait).await {
                Ok(s) => {
                    if i != start {
                        self.inner.current.store(i, Ordering::Relaxed);
                        tracing::info!(address = %s.address, "now using {}", s.address);
                    }
                    return Ok(s);
                }
                Err(e) if k + 1 < n && e.should_fail_over() => {
                    tracing::warn!("{}: {}; trying the next address", self.inner.cfg.addresses[i], brief(&e));
                    k += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Moves the client off `address` (the next request starts with the following address)
    /// if it is still the current one: for answers that say this server cannot serve now
    /// (an etcd member without a leader) though it can be reached.
    pub fn fail_over(&self, address: &ConsulAddr) {
        let list = &self.inner.cfg.addresses;
        if list.len() < 2 {
            return;
        }
        let cur = self.inner.current.load(Ordering::Relaxed) % list.len();
        if &list[cur] == address {
            let next = (cur + 1) % list.len();
            self.inner.current.store(next, Ordering::Relaxed);
            tracing::info!(address = %list[next], "moving from {address} to {}", list[next]);
        }
    }

    async fn open_stream(
        &self,
        i: usize,
        method: &Method,
        path: &str,
        body: &Bytes,
        headers: &[(&str, &str)],
        wait: Duration,
    ) -> Result<Stream, Error> {
        let address = &self.inner.cfg.addresses[i];
        let (mut reused, mut slot) = match self.acquire(i, true).await {
            Acquired::Idle(c) => (Some(c), None),
            Acquired::New(p) => (None, p),
        };
        let timeout = self.inner.cfg.request_timeout + wait;
        let transport =
            |message: String| Error::Transport { address: address.clone(), method: method.to_string(), path: path.to_string(), message };
        loop {
            let (mut conn, was_reused) = self.next_conn(i, &mut reused, &mut slot).await?;
            let mut req = self.build_request(address, method, path, body)?;
            for (name, value) in headers {
                let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| Error::Config(format!("header name `{name}`: {e}")))?;
                let value = HeaderValue::from_str(value).map_err(|e| Error::Config(format!("header `{name}`: {e}")))?;
                req.headers_mut().insert(name, value);
            }
            let (parts, incoming, driver_done) = match tokio::time::timeout(timeout, head(&mut conn, req)).await {
                Err(_) => {
                    return Err(Error::Timeout {
                        address: address.clone(),
                        method: method.to_string(),
                        path: path.to_string(),
                        after: timeout,
                    })
                }
                Ok(Ok(r)) => r,
                // A pooled connection the server had closed meanwhile.
                Ok(Err(_)) if was_reused => continue,
                Ok(Err(m)) if address.scheme == Scheme::Https && (m.contains("alert") || m.contains("certificate")) => {
                    return Err(Error::Tls { address: address.clone(), message: m })
                }
                Ok(Err(m)) => return Err(transport(m)),
            };
            let status = parts.status.as_u16();
            tracing::debug!(address = %address, %method, path, status, "streamed answer");
            let keep_alive = !parts.headers.get(CONNECTION).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
            return Ok(Stream {
                client: self.clone(),
                index: i,
                conn: Some(conn),
                body: incoming,
                status,
                headers: parts.headers,
                address: address.clone(),
                method: method.to_string(),
                path: path.to_string(),
                keep_alive,
                driving: Driving { done: driver_done, err: None },
            });
        }
    }
}

/// What went wrong, without the words of [`Error`]'s messages (which name Consul): this path
/// serves etcd.
fn brief(e: &Error) -> String {
    match e {
        Error::Connect { message, .. } => format!("cannot connect ({message})"),
        Error::Tls { message, .. } => format!("TLS handshake failed ({message})"),
        Error::Timeout { method, path, after, .. } => format!("no answer to {method} {path} within {after:?}"),
        Error::Transport { method, path, message, .. } => format!("{method} {path} failed ({message})"),
        other => other.to_string(),
    }
}

/// Sends `req` and waits for the answer's head, driving the connection (as [`send`] does).
async fn head(conn: &mut Conn, req: Request<Full<Bytes>>) -> Result<(hyper::http::response::Parts, Incoming, bool), String> {
    let Conn { sender, driver, shared, .. } = conn;
    *shared.first_read.lock().unwrap_or_else(|p| p.into_inner()) = None;
    let mut driving = Driving::default();
    let exchange = async {
        std::future::poll_fn(|cx| sender.poll_ready(cx)).await.map_err(|e| e.to_string())?;
        sender.try_send_request(req).await.map_err(|e| error_chain(e.error()))
    };
    match driven(exchange, driver, &mut driving, |_| None).await {
        Ok(resp) => {
            let (parts, body) = resp.into_parts();
            Ok((parts, body, driving.done))
        }
        Err(m) => Err(driving.why(shared).unwrap_or(m)),
    }
}

/// What one poll of the body gave.
enum Got {
    Frame(Option<Result<Frame<Bytes>, hyper::Error>>),
    /// The connection ended while the body still waited for data.
    Closed,
}

impl Stream {
    pub fn status(&self) -> u16 {
        self.status
    }

    /// A header of the answer, if present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The address that answered.
    pub fn address(&self) -> &ConsulAddr {
        &self.address
    }

    /// The next piece of the body as it arrived; `None` at its end. Not bounded in time: a
    /// stream may stay silent for as long as its server likes (wrap it in a timeout).
    /// Cancel-safe: nothing is lost when the future is dropped before it completes.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, Error> {
        loop {
            let Some(conn) = self.conn.as_mut() else { return Ok(None) };
            let (body, driver, driving) = (&mut self.body, &mut conn.driver, &mut self.driving);
            let got = std::future::poll_fn(|cx| {
                if let Poll::Ready(f) = Pin::new(&mut *body).poll_frame(cx) {
                    return Poll::Ready(Got::Frame(f));
                }
                if driving.done {
                    return Poll::Ready(Got::Closed);
                }
                if driving.poll(driver, cx) {
                    return match Pin::new(&mut *body).poll_frame(cx) {
                        Poll::Ready(f) => Poll::Ready(Got::Frame(f)),
                        Poll::Pending => Poll::Ready(Got::Closed),
                    };
                }
                Poll::Pending
            })
            .await;
            match got {
                Got::Frame(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        if !data.is_empty() {
                            return Ok(Some(data));
                        }
                    }
                }
                Got::Frame(None) => {
                    self.finish();
                    return Ok(None);
                }
                Got::Frame(Some(Err(e))) => {
                    let why = self.driving.err.take().unwrap_or_else(|| error_chain(&e));
                    return Err(self.broken(format!("reading the answer: {why}")));
                }
                Got::Closed => {
                    let why = self.driving.err.take().unwrap_or_else(|| "the connection was closed".into());
                    return Err(self.broken(format!("the answer ended early: {why}")));
                }
            }
        }
    }

    /// The rest of the body, refused beyond `limit` bytes (a larger `Content-Length` before
    /// any of it is read) and cut when it is not complete within the client's request timeout.
    pub async fn read_to_end(mut self, limit: usize) -> Result<Bytes, Error> {
        let declared = self.headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(Error::TooLarge { address: self.address.clone(), path: self.path.clone(), limit });
        }
        let transfer = self.client.inner.cfg.request_timeout;
        let (address, method, path) = (self.address.clone(), self.method.clone(), self.path.clone());
        let mut buf = BytesMut::with_capacity(declared.unwrap_or(0) as usize);
        let read = async {
            while let Some(data) = self.chunk().await? {
                if buf.len() + data.len() > limit {
                    return Err(Error::TooLarge { address: address.clone(), path: path.clone(), limit });
                }
                buf.extend_from_slice(&data);
            }
            Ok(())
        };
        match tokio::time::timeout(transfer, read).await {
            Ok(r) => r.map(|()| buf.freeze()),
            Err(_) => Err(Error::Stalled { address, method, path, after: transfer }),
        }
    }

    /// The body ended: the connection goes back to the pool when it can carry another request.
    fn finish(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.keep_alive && !self.driving.done && !conn.sender.is_closed() {
                self.client.checkin(self.index, conn);
            }
        }
    }

    fn broken(&mut self, message: String) -> Error {
        self.conn = None;
        Error::Transport { address: self.address.clone(), method: self.method.clone(), path: self.path.clone(), message }
    }
}
