//! Serving DNS. Queries are parsed and answers encoded by hickory (`Request`,
//! `MessageResponseBuilder`), and answered by [`Responder`] from the current snapshot.
//!
//! - UDP: one thread per socket, several sockets per address bound with `SO_REUSEPORT` so the
//!   kernel spreads clients over the cores. Each thread receives and sends in batches
//!   (`recvmmsg`/`sendmmsg`) and answers from the snapshot without locks. This is our own
//!   loop rather than hickory's `Server::register_socket`, which spawns a task per packet,
//!   funnels every answer through one channel per socket and makes two system calls per
//!   query (the profile of a loaded server is mostly those system calls and the wake-ups).
//! - TCP: [`crate::tcp`] (bounded connections, idle timeouts), answering with
//!   [`Responder::handle_tcp`].
//! - Forwarded queries (names outside the zone, allowed clients) run on the tokio runtime.
use std::io::{IoSlice, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hickory_proto::op::{Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncodable, BinEncoder};
use hickory_server::net::xfer::Protocol;
use hickory_server::server::Request;
use hickory_server::zone_handler::MessageResponseBuilder;
use nix::errno::Errno;
use nix::sys::socket::{recvmmsg, sendmmsg, MsgFlags, MultiHeaders, SockaddrStorage};
use socket2::{Domain, Socket, Type};
use tokio::sync::Semaphore;

use crate::answer::{Answer, Outcome, Params};
use crate::config::ServerConfig;
use crate::forward::Forwarder;
use crate::metrics::{Drop, Metrics, Proto, Shard};
use crate::rrl::{Rrl, Verdict};
use crate::snapshot::Snapshot;
use crate::wire::{record_type, Query, WireScratch, Written};

/// Our OPT record: root owner, type, payload size, extended RCODE, version, flags, RDLENGTH.
const OPT_LEN: usize = 11;

/// At most this many forwarded queries in flight; more get SERVFAIL at once rather than
/// piling up tasks (an allowed client flooding random names cannot exhaust memory).
const MAX_FORWARDS_IN_FLIGHT: usize = 4096;

/// What the answering side shares with the Consul feed.
#[derive(Debug)]
pub struct Shared {
    /// The snapshot answered from, swapped whole by the feed.
    pub snapshot: ArcSwap<Snapshot>,
    pub metrics: Arc<Metrics>,
}

impl Shared {
    /// Serving `snapshot`, with fresh metrics (benchmarks, tests).
    pub fn new(snapshot: Snapshot) -> Arc<Shared> {
        Arc::new(Shared { snapshot: ArcSwap::from_pointee(snapshot), metrics: Metrics::new() })
    }
}

/// Reusable buffers of one UDP thread.
#[derive(Default)]
pub struct Scratch {
    pub answer: Answer,
    pub out: Vec<u8>,
    rotation: usize,
    wire: WireScratch,
}

/// The local decision for a request.
enum Local {
    /// Send `Metadata` with the sections in the `Answer`.
    Reply(Metadata),
    /// Outside our zones and the client may recurse.
    Forward,
}

/// What a UDP thread does with a packet.
pub enum UdpStep {
    /// `Scratch::out` holds the answer.
    Send {
        qtype: RecordType,
        rcode: ResponseCode,
    },
    Forward(Box<Request>),
    /// Rate limited (RRL slip): `Scratch::out` holds an empty truncated answer (TC=1).
    Slip,
    Drop(Drop),
}

/// Answers requests from the current snapshot, or decides to forward them.
pub struct Responder {
    shared: Arc<Shared>,
    forwarder: Option<Forwarder>,
    forwards: Arc<Semaphore>,
    /// Our OPT record: EDNS version 0, our UDP payload size.
    edns: Edns,
    max_udp_payload: u16,
    udp_answer_limit: usize,
    tcp_rotation: AtomicUsize,
    /// Response rate limiting of UDP answers (`None`: off).
    rrl: Option<Rrl>,
    /// Answer from the snapshot's wire forms when the question allows ([`crate::wire`]).
    precompiled: bool,
}

impl Responder {
    pub fn new(shared: Arc<Shared>, forwarder: Option<Forwarder>, cfg: &ServerConfig) -> Responder {
        let mut edns = Edns::new();
        edns.set_max_payload(cfg.max_udp_payload).set_version(0);
        Responder {
            shared,
            forwarder,
            forwards: Arc::new(Semaphore::new(MAX_FORWARDS_IN_FLIGHT)),
            edns,
            max_udp_payload: cfg.max_udp_payload,
            udp_answer_limit: cfg.udp_answer_limit,
            tcp_rotation: AtomicUsize::new(0),
            rrl: Rrl::new(&cfg.rrl),
            precompiled: true,
        }
    }

    /// Turns the precompiled path off (every answer encoded): for benchmarks and the tests that
    /// compare both paths.
    pub fn set_precompiled(&mut self, on: bool) {
        self.precompiled = on;
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    fn may_recurse(&self, client: IpAddr) -> bool {
        self.forwarder.as_ref().is_some_and(|f| f.allows(client))
    }

    /// Answers what can be answered locally into `ans`.
    fn decide(&self, req: &Request, proto: Proto, rotation: usize, ans: &mut Answer) -> (Local, RecordType) {
        ans.clear();
        let mut md = Metadata::response_from_request(&req.metadata);
        md.recursion_available = self.may_recurse(req.src().ip());
        let qtype = req.queries.queries().first().map_or(RecordType::Unknown(0), |q| q.query_type());
        let reply = |mut md: Metadata, rcode| {
            md.response_code = rcode;
            (Local::Reply(md), qtype)
        };
        if req.metadata.op_code != OpCode::Query {
            return reply(md, ResponseCode::NotImp);
        }
        if req.edns.as_ref().is_some_and(|e| e.version() > 0) {
            return reply(md, ResponseCode::BADVERS);
        }
        let [q] = req.queries.queries() else { return reply(md, ResponseCode::FormErr) };
        if q.query_class() != DNSClass::IN && q.query_class() != DNSClass::ANY {
            return reply(md, ResponseCode::Refused);
        }
        if matches!(qtype, RecordType::AXFR | RecordType::IXFR) {
            // No zone transfers: the zone is generated from Consul.
            return reply(md, ResponseCode::Refused);
        }
        let limit = if proto == Proto::Udp { self.udp_answer_limit } else { 0 };
        let snap = self.shared.snapshot.load();
        match snap.answer(q.name(), qtype, Params { rotation, limit }, ans) {
            Outcome::Authoritative if !snap.synced => {
                ans.clear();
                reply(md, ResponseCode::ServFail)
            }
            Outcome::Authoritative => {
                md.authoritative = true;
                reply(md, ans.rcode)
            }
            Outcome::NotOurs if md.recursion_available => (Local::Forward, qtype),
            Outcome::NotOurs => reply(md, ResponseCode::Refused),
        }
    }

    /// Resolves a forwarded request into `ans`; the response header.
    async fn forward_into(&self, req: &Request, ans: &mut Answer) -> Metadata {
        let mut md = Metadata::response_from_request(&req.metadata);
        md.recursion_available = true;
        ans.clear();
        let (Some(fwd), [q]) = (&self.forwarder, req.queries.queries()) else {
            md.response_code = ResponseCode::ServFail;
            return md;
        };
        let f = fwd.resolve(q.original().name().clone(), q.query_type()).await;
        md.response_code = f.rcode;
        ans.answers = f.answers;
        ans.authority = f.authority;
        md
    }

    /// The largest UDP answer for this request: what the client offers (512 without EDNS,
    /// RFC 1035), capped by our own limit.
    fn udp_limit(&self, req: &Request) -> u16 {
        match &req.edns {
            Some(e) => e.max_payload().clamp(512, self.max_udp_payload),
            None => 512,
        }
    }

    /// Encodes the answer into `out`, within `max` bytes. An answer that does not fit is
    /// replaced by the header and question with TC set (the client retries over TCP), rather
    /// than a partial RRset. Returns whether it was truncated.
    fn encode(&self, req: &Request, md: Metadata, ans: &Answer, max: u16, out: &mut Vec<u8>) -> bool {
        let edns = req.edns.as_ref().map(|_| &self.edns);
        out.clear();
        let full = MessageResponseBuilder::new(&req.queries, edns).build(
            md,
            ans.answers.iter(),
            ans.authority.iter(),
            std::iter::empty(),
            ans.additional.iter(),
        );
        let mut enc = BinEncoder::new(out);
        enc.set_max_size(max);
        if matches!(full.destructive_emit(&mut enc), Ok(info) if !info.truncation) {
            return false;
        }
        self.encode_tc(req, md, out);
        true
    }

    /// An empty answer with TC set: header, question and our OPT record only, never larger
    /// than the query (truncated answers and RRL slips).
    fn encode_tc(&self, req: &Request, md: Metadata, out: &mut Vec<u8>) {
        let edns = req.edns.as_ref().map(|_| &self.edns);
        out.clear();
        let mut md = md;
        md.truncation = true;
        let empty: [Record; 0] = [];
        let short = MessageResponseBuilder::new(&req.queries, edns).build(md, empty.iter(), empty.iter(), empty.iter(), empty.iter());
        let mut enc = BinEncoder::new(out);
        enc.set_max_size(u16::MAX);
        if short.destructive_emit(&mut enc).is_err() {
            header_only(md.id, md.op_code, ResponseCode::ServFail, out);
        }
    }

    /// One UDP packet. Answers locally into `scratch.out`, or says to forward or drop it.
    /// Clients outside the networks allowed recursion are rate limited (see [`crate::rrl`]).
    pub fn handle_udp(&self, raw: &[u8], src: SocketAddr, scratch: &mut Scratch) -> UdpStep {
        let Ok(header) = Header::read(&mut BinDecoder::new(raw)) else { return UdpStep::Drop(Drop::Malformed) };
        if header.metadata.message_type == MessageType::Response {
            return UdpStep::Drop(Drop::Response);
        }
        let verdict = match &self.rrl {
            Some(rrl) if !rrl.exempt(src.ip()) => rrl.check(src.ip(), Instant::now()),
            _ => Verdict::Send,
        };
        if verdict == Verdict::Drop {
            return UdpStep::Drop(Drop::RateLimited);
        }
        if verdict == Verdict::Send && self.precompiled {
            if let Some(step) = self.answer_precompiled(raw, src, scratch) {
                return step;
            }
        }
        let req = match Request::from_bytes(raw.to_vec(), src, Protocol::Udp) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(%src, "malformed query: {e}");
                header_only(header.metadata.id, header.metadata.op_code, ResponseCode::FormErr, &mut scratch.out);
                return UdpStep::Send { qtype: RecordType::Unknown(0), rcode: ResponseCode::FormErr };
            }
        };
        if verdict == Verdict::Slip {
            self.encode_tc(&req, Metadata::response_from_request(&req.metadata), &mut scratch.out);
            return UdpStep::Slip;
        }
        scratch.rotation = scratch.rotation.wrapping_add(1);
        let (local, qtype) = self.decide(&req, Proto::Udp, scratch.rotation, &mut scratch.answer);
        match local {
            Local::Forward => UdpStep::Forward(Box::new(req)),
            Local::Reply(md) => {
                let rcode = md.response_code;
                let max = self.udp_limit(&req);
                if self.encode(&req, md, &scratch.answer, max, &mut scratch.out) {
                    self.shared.metrics.shared.truncated();
                }
                UdpStep::Send { qtype, rcode }
            }
        }
    }

    /// The answer from the snapshot's wire forms into `scratch.out`, when the question is one
    /// they cover (see [`crate::wire`]); `None` leaves the query to the encoding path. The
    /// same answer as [`Responder::encode`] would give, rotation included.
    fn answer_precompiled(&self, raw: &[u8], src: SocketAddr, scratch: &mut Scratch) -> Option<UdpStep> {
        if self.udp_answer_limit != 0 {
            return None;
        }
        let q = Query::parse(raw)?;
        let snap = self.shared.snapshot.load();
        if !snap.synced {
            return None;
        }
        let max = q.edns.map_or(512, |p| p.clamp(512, self.max_udp_payload)) as usize;
        let opt_len = if q.edns.is_some() { OPT_LEN } else { 0 };
        let rotation = scratch.rotation.wrapping_add(1);
        let out = &mut scratch.out;
        out.clear();
        out.extend_from_slice(&[0; 12]);
        out.extend_from_slice(&raw[12..q.question_end]);
        let written = snap.answer_wire(&q, rotation, max - opt_len, out, &mut scratch.wire)?;
        scratch.rotation = rotation;
        // QR, AA, RD and CD echoed, RA when the client may recurse.
        let mut flags = 0x8400 | (q.flags & 0x0110);
        if self.may_recurse(src.ip()) {
            flags |= 0x0080;
        }
        let (rcode, counts) = match written {
            Written::Sections { rcode, answers, authority, additional } => (rcode, [answers, authority, additional]),
            Written::TooLarge { rcode } => {
                out.truncate(q.question_end);
                flags |= 0x0200;
                self.shared.metrics.shared.truncated();
                (rcode, [0, 0, 0])
            }
        };
        flags |= u16::from(rcode) & 0x000F;
        let additional = counts[2] + u16::from(q.edns.is_some());
        if q.edns.is_some() {
            out.extend_from_slice(&[0, 0, 41]);
            out.extend_from_slice(&self.max_udp_payload.max(512).to_be_bytes());
            out.extend_from_slice(&[0; 6]);
        }
        let mut header = [0u8; 12];
        header[..2].copy_from_slice(&q.id.to_be_bytes());
        header[2..4].copy_from_slice(&flags.to_be_bytes());
        header[4..6].copy_from_slice(&1u16.to_be_bytes());
        header[6..8].copy_from_slice(&counts[0].to_be_bytes());
        header[8..10].copy_from_slice(&counts[1].to_be_bytes());
        header[10..12].copy_from_slice(&additional.to_be_bytes());
        out[..12].copy_from_slice(&header);
        Some(UdpStep::Send { qtype: record_type(q.qtype), rcode })
    }

    /// One DNS-over-TCP message (without its length prefix): the answer in `out`, whole (up
    /// to 65,535 bytes). False when there is nothing to answer (a response, or shorter than a
    /// header). TCP is not rate limited: its source address cannot be spoofed.
    pub async fn handle_tcp(&self, raw: &[u8], src: SocketAddr, out: &mut Vec<u8>) -> bool {
        let start = Instant::now();
        let shard = &self.shared.metrics.shared;
        let Ok(header) = Header::read(&mut BinDecoder::new(raw)) else {
            shard.dropped(Drop::Malformed);
            return false;
        };
        if header.metadata.message_type == MessageType::Response {
            shard.dropped(Drop::Response);
            return false;
        }
        let req = match Request::from_bytes(raw.to_vec(), src, Protocol::Tcp) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(%src, "malformed query over TCP: {e}");
                header_only(header.metadata.id, header.metadata.op_code, ResponseCode::FormErr, out);
                shard.answered(Proto::Tcp, RecordType::Unknown(0), ResponseCode::FormErr, start.elapsed());
                return true;
            }
        };
        let mut ans = Answer::default();
        let rotation = self.tcp_rotation.fetch_add(1, Ordering::Relaxed);
        let (local, qtype) = self.decide(&req, Proto::Tcp, rotation, &mut ans);
        let md = match local {
            Local::Reply(md) => md,
            Local::Forward => {
                shard.forwarded();
                self.forward_into(&req, &mut ans).await
            }
        };
        self.encode(&req, md, &ans, u16::MAX, out);
        shard.answered(Proto::Tcp, qtype, md.response_code, start.elapsed());
        true
    }

    /// Forwards a UDP request on the runtime and sends the answer from there.
    fn spawn_forward(self: &Arc<Self>, rt: &tokio::runtime::Handle, req: Box<Request>, sock: Arc<std::net::UdpSocket>, start: Instant) {
        let shard = self.shared.metrics.shared.clone();
        let qtype = req.queries.queries().first().map_or(RecordType::Unknown(0), |q| q.query_type());
        let Ok(permit) = self.forwards.clone().try_acquire_owned() else {
            let mut out = Vec::new();
            header_only(req.metadata.id, req.metadata.op_code, ResponseCode::ServFail, &mut out);
            let _ = sock.send_to(&out, req.src());
            shard.answered(Proto::Udp, qtype, ResponseCode::ServFail, start.elapsed());
            return;
        };
        let me = self.clone();
        rt.spawn(async move {
            let _permit = permit;
            let mut ans = Answer::default();
            let md = me.forward_into(&req, &mut ans).await;
            let mut out = Vec::with_capacity(512);
            if me.encode(&req, md, &ans, me.udp_limit(&req), &mut out) {
                shard.truncated();
            }
            let _ = sock.send_to(&out, req.src());
            shard.forwarded();
            shard.answered(Proto::Udp, qtype, md.response_code, start.elapsed());
        });
    }
}

/// A bare header answer (FORMERR for unparseable queries, SERVFAIL), no question echoed.
fn header_only(id: u16, op_code: OpCode, rcode: ResponseCode, out: &mut Vec<u8>) {
    let mut metadata = Metadata::new(id, MessageType::Response, op_code);
    metadata.response_code = rcode;
    out.clear();
    let header = Header { metadata, counts: HeaderCounts::default() };
    // A 12-byte header always fits.
    let _ = header.emit(&mut BinEncoder::new(out));
}

/// A UDP socket for `addr` that shares the port with its siblings (`SO_REUSEPORT`).
fn reuseport_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    sock.set_reuse_port(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    // Room for bursts; the kernel caps it at net.core.rmem_max.
    let _ = sock.set_recv_buffer_size(4 << 20);
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

/// The running UDP threads.
pub struct UdpServer {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// The bound address of each listen address (port 0 resolved).
    pub bound: Vec<SocketAddr>,
}

impl UdpServer {
    /// Binds `workers` sockets per address (all before any thread starts, so a taken port
    /// fails start-up with a clear error) and starts one thread per socket.
    pub fn start(
        listen: &[SocketAddr],
        workers: usize,
        responder: Arc<Responder>,
        rt: tokio::runtime::Handle,
    ) -> anyhow::Result<UdpServer> {
        let mut sockets = Vec::new();
        let mut bound = Vec::new();
        for &addr in listen {
            let first = reuseport_udp(addr).map_err(|e| anyhow::anyhow!("binding UDP {addr}: {e}"))?;
            let actual = first.local_addr()?;
            bound.push(actual);
            sockets.push(first);
            for _ in 1..workers {
                sockets.push(reuseport_udp(actual).map_err(|e| anyhow::anyhow!("binding UDP {actual} (SO_REUSEPORT): {e}"))?);
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (i, sock) in sockets.into_iter().enumerate() {
            sock.set_read_timeout(Some(Duration::from_millis(250)))?;
            let (responder, rt, stop) = (responder.clone(), rt.clone(), stop.clone());
            let shard = responder.metrics().shard();
            let t = std::thread::Builder::new()
                .name(format!("dns-udp-{i}"))
                .spawn(move || udp_loop(Arc::new(sock), &responder, &shard, &rt, &stop))?;
            threads.push(t);
        }
        Ok(UdpServer { stop, threads, bound })
    }

    /// Stops receiving and waits for the threads (each finishes the packet in hand).
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Datagrams received (and answered) per system call at most.
const BATCH: usize = 32;

fn to_std(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
}

/// One UDP thread: receives up to [`BATCH`] datagrams per `recvmmsg` (waiting for the first
/// only), answers them, and sends the answers with one `sendmmsg`. Under load this divides the
/// system calls, and the wake-ups of the clients, by the batch size; when idle it behaves like
/// recv/send one by one.
fn udp_loop(sock: Arc<std::net::UdpSocket>, responder: &Arc<Responder>, shard: &Shard, rt: &tokio::runtime::Handle, stop: &AtomicBool) {
    let fd = sock.as_raw_fd();
    // A query is at most 512 bytes without EDNS, and a client offering a larger payload may
    // still only send what fits its own buffer; longer datagrams are cut and get FORMERR.
    let mut bufs: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; 4096]).collect();
    let mut outs: Vec<Vec<u8>> = (0..BATCH).map(|_| Vec::with_capacity(1232)).collect();
    let mut rx_headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut tx_headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut got: Vec<(usize, Option<SocketAddr>)> = Vec::with_capacity(BATCH);
    let mut dests: Vec<Option<SockaddrStorage>> = Vec::with_capacity(BATCH);
    let mut answered: Vec<(RecordType, ResponseCode)> = Vec::with_capacity(BATCH);
    let mut scratch = Scratch { out: Vec::with_capacity(1232), ..Scratch::default() };
    while !stop.load(Ordering::Relaxed) {
        got.clear();
        {
            let mut iovs: Vec<[IoSliceMut; 1]> = bufs.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
            match recvmmsg(fd, &mut rx_headers, iovs.iter_mut(), MsgFlags::MSG_WAITFORONE, None) {
                Ok(msgs) => got.extend(msgs.map(|m| (m.bytes, m.address.as_ref().and_then(to_std)))),
                // The receive timeout (to look at `stop`), a signal.
                Err(Errno::EAGAIN | Errno::EINTR) => continue,
                Err(e) => {
                    // ICMP errors of earlier sends (ECONNREFUSED...) surface here.
                    tracing::debug!("UDP receive: {e}");
                    continue;
                }
            }
        }
        let start = Instant::now();
        dests.clear();
        answered.clear();
        for (i, &(len, src)) in got.iter().enumerate() {
            let Some(src) = src.filter(|s| s.port() != 0) else {
                shard.dropped(Drop::Malformed);
                continue;
            };
            match responder.handle_udp(&bufs[i][..len], src, &mut scratch) {
                UdpStep::Send { qtype, rcode } => {
                    std::mem::swap(&mut scratch.out, &mut outs[dests.len()]);
                    dests.push(Some(SockaddrStorage::from(src)));
                    answered.push((qtype, rcode));
                }
                UdpStep::Slip => {
                    std::mem::swap(&mut scratch.out, &mut outs[dests.len()]);
                    dests.push(Some(SockaddrStorage::from(src)));
                    shard.slipped();
                }
                UdpStep::Forward(req) => responder.spawn_forward(rt, req, sock.clone(), start),
                UdpStep::Drop(why) => shard.dropped(why),
            }
        }
        let mut sent = 0;
        while sent < dests.len() {
            let iovs: Vec<[IoSlice; 1]> = outs[sent..dests.len()].iter().map(|o| [IoSlice::new(o)]).collect();
            match sendmmsg(fd, &mut tx_headers, &iovs, &dests[sent..], [], MsgFlags::empty()).map(|r| r.count()) {
                Ok(0) => break,
                Ok(n) => sent += n.min(iovs.len()),
                Err(e) => {
                    // This datagram cannot go (e.g. EPERM from a firewall): skip it, send the rest.
                    tracing::debug!(dest = ?dests[sent].as_ref().and_then(to_std), "UDP send: {e}");
                    sent += 1;
                }
            }
        }
        let took = start.elapsed();
        for &(qtype, rcode) in &answered {
            shard.answered(Proto::Udp, qtype, rcode, took);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RData, Record};

    use super::*;
    use crate::config::ServerConfig;
    use crate::snapshot::tests::{inst, zone};

    fn responder(instances: Vec<crate::snapshot::Instance>) -> Responder {
        responder_with(Arc::new(Snapshot::build(9, zone(), instances)), 1232)
    }

    fn responder_with(snap: Arc<Snapshot>, max_udp_payload: u16) -> Responder {
        let shared = Arc::new(Shared { snapshot: ArcSwap::new(snap), metrics: Metrics::new() });
        let cfg = ServerConfig {
            listen: vec![],
            udp_workers: 1,
            max_udp_payload,
            udp_answer_limit: 0,
            tcp_idle_timeout: Duration::from_secs(1),
            max_tcp_connections: 8,
            rrl: crate::rrl::RrlConfig { rate: 3, exempt: vec!["127.0.0.0/8".parse().unwrap()], ..Default::default() },
        };
        Responder::new(shared, None, &cfg)
    }

    fn query(name: &str, t: RecordType, edns: Option<u16>) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 4242;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_str(name).unwrap(), t));
        if let Some(p) = edns {
            let mut e = Edns::new();
            e.set_max_payload(p);
            m.edns = Some(e);
        }
        m.to_vec().unwrap()
    }

    fn ask(r: &Responder, raw: &[u8]) -> Message {
        let mut s = Scratch::default();
        match r.handle_udp(raw, "127.0.0.1:5000".parse().unwrap(), &mut s) {
            UdpStep::Send { .. } => Message::from_vec(&s.out).unwrap(),
            UdpStep::Forward(_) => panic!("forwarded"),
            UdpStep::Slip => panic!("rate limited"),
            UdpStep::Drop(d) => panic!("dropped: {d:?}"),
        }
    }

    #[test]
    fn answers_with_aa_and_echoes_id_and_question() {
        let r = responder(vec![inst("web", "w1", "10.0.0.1", 80)]);
        // hickory's encoder lower-cases names: put capitals in the wire bytes by hand.
        let mut raw = query("web.service.upsync.", RecordType::A, None);
        raw[13] = b'W';
        raw[17] = b'S';
        let m = ask(&r, &raw);
        assert_eq!(m.metadata.id, 4242);
        assert!(m.metadata.authoritative && m.metadata.recursion_desired && !m.metadata.recursion_available);
        assert_eq!(m.queries[0].name().to_ascii(), "Web.Service.upsync.", "question echoed with its case");
        assert_eq!(m.answers.len(), 1);
        assert!(matches!(m.answers[0].data, RData::A(_)));
        assert!(m.edns.is_none());
    }

    #[test]
    fn refuses_outside_the_zone_without_forwarding() {
        let r = responder(vec![]);
        let m = ask(&r, &query("example.com.", RecordType::A, Some(1232)));
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
        assert!(!m.metadata.authoritative);
    }

    #[test]
    fn large_answers_are_truncated_over_udp_only_to_what_the_client_offers() {
        let many: Vec<_> = (0..300).map(|i| inst("big", &format!("b{i}"), &format!("10.1.{}.{}", i / 250, i % 250 + 1), 8000)).collect();
        let r = responder(many);
        let small = ask(&r, &query("big.service.upsync.", RecordType::SRV, None));
        assert!(small.metadata.truncation);
        assert!(small.answers.is_empty());
        assert_eq!(small.queries.len(), 1);
        let with_edns = ask(&r, &query("big.service.upsync.", RecordType::A, Some(4096)));
        // 300 A records need ~4.8 kB: more than our 1232-byte cap.
        assert!(with_edns.metadata.truncation);
        assert_eq!(with_edns.edns.as_ref().map(|e| e.max_payload()), Some(1232));
        let fits = ask(&r, &query("big.service.upsync.", RecordType::A, None));
        assert!(fits.metadata.truncation);
    }

    #[test]
    fn edns_is_answered_with_our_payload_size_and_badvers_above_version_0() {
        let r = responder(vec![inst("web", "w1", "10.0.0.1", 80)]);
        let m = ask(&r, &query("web.service.upsync.", RecordType::A, Some(4096)));
        assert_eq!(m.edns.as_ref().map(|e| (e.max_payload(), e.version())), Some((1232, 0)));
        let mut raw = Message::from_vec(&query("web.service.upsync.", RecordType::A, Some(1232))).unwrap();
        raw.edns.as_mut().unwrap().set_version(1);
        let m = ask(&r, &raw.to_vec().unwrap());
        // BADVERS and BADSIG share code 16.
        assert_eq!(u16::from(m.metadata.response_code), 16);
    }

    #[test]
    fn bad_packets_are_dropped_or_get_formerr() {
        let r = responder(vec![]);
        let mut s = Scratch::default();
        let src: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        assert!(matches!(r.handle_udp(&[1, 2, 3], src, &mut s), UdpStep::Drop(Drop::Malformed)));
        // A header claiming one question, and nothing after it.
        let truncated = [0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
        let UdpStep::Send { rcode, .. } = r.handle_udp(&truncated, src, &mut s) else { panic!("no answer") };
        assert_eq!(rcode, ResponseCode::FormErr);
        let m = Message::from_vec(&s.out).unwrap();
        assert_eq!((m.metadata.id, m.metadata.response_code), (0x1234, ResponseCode::FormErr));
        // A response (QR=1) is never answered.
        let mut resp = query("web.service.upsync.", RecordType::A, None);
        resp[2] |= 0x80;
        assert!(matches!(r.handle_udp(&resp, src, &mut s), UdpStep::Drop(Drop::Response)));
        // Every prefix of a valid query, and garbage: no panic.
        let q = query("web.service.upsync.", RecordType::SRV, Some(1232));
        for n in 0..q.len() {
            let _ = r.handle_udp(&q[..n], src, &mut s);
        }
        for seed in 0..2000u32 {
            let junk: Vec<u8> =
                (0..(seed % 80) as usize).map(|i| (seed.wrapping_mul(2654435761).wrapping_add(i as u32 * 40503) >> 7) as u8).collect();
            let _ = r.handle_udp(&junk, src, &mut s);
        }
    }

    #[test]
    fn clients_outside_allow_recursion_are_rate_limited_with_slips() {
        let many: Vec<_> = (0..10).map(|i| inst("big", &format!("b{i}"), &format!("10.1.0.{}", i + 1), 8000)).collect();
        let r = responder(many);
        let q = query("big.service.upsync.", RecordType::SRV, Some(4096));
        let mut s = Scratch::default();
        let spoofed: SocketAddr = "192.0.2.1:4444".parse().unwrap();
        let steps: Vec<&str> = (0..9)
            .map(|_| match r.handle_udp(&q, spoofed, &mut s) {
                UdpStep::Send { .. } => "send",
                UdpStep::Slip => {
                    let m = Message::from_vec(&s.out).unwrap();
                    assert!(m.metadata.truncation && m.answers.is_empty());
                    assert!(s.out.len() <= q.len(), "a slip is no larger than the query");
                    "slip"
                }
                UdpStep::Drop(Drop::RateLimited) => "drop",
                _ => "other",
            })
            .collect();
        assert_eq!(steps, ["send", "send", "send", "drop", "slip", "drop", "slip", "drop", "slip"]);
        // Exempt (loopback here): never limited.
        for _ in 0..50 {
            assert!(!ask(&r, &q).answers.is_empty());
        }
    }

    #[test]
    fn two_questions_and_other_opcodes() {
        let r = responder(vec![]);
        let mut m = Message::from_vec(&query("web.service.upsync.", RecordType::A, None)).unwrap();
        m.add_query(Query::query(Name::from_str("api.service.upsync.").unwrap(), RecordType::A));
        assert_eq!(ask(&r, &m.to_vec().unwrap()).metadata.response_code, ResponseCode::FormErr);
        let mut m = Message::from_vec(&query("web.service.upsync.", RecordType::A, None)).unwrap();
        m.metadata.op_code = OpCode::Status;
        assert_eq!(ask(&r, &m.to_vec().unwrap()).metadata.response_code, ResponseCode::NotImp);
        let axfr = ask(&r, &query("service.upsync.", RecordType::AXFR, None));
        assert_eq!(axfr.metadata.response_code, ResponseCode::Refused);
    }

    /// A 10,000-instance catalog with every shape the precompiled path meets: services of 0 to
    /// 300 instances (over 512 bytes, over 1232, over 4096), tags, backups, IPv6, host names,
    /// several ports on one address, failing and down instances.
    fn catalog() -> Vec<crate::snapshot::Instance> {
        use crate::snapshot::Health;
        let mut v = Vec::new();
        let mut s = 0;
        while v.len() < 10_000 {
            let n = match s % 17 {
                0 => 300,
                1 => 40,
                2 => 0,
                k => k,
            };
            for k in 0..n.max(1) {
                let i = v.len();
                let ip = match (s % 5, k % 4) {
                    (4, 3) => format!("host{k}.example.com"),
                    (3, _) => format!("2001:db8::{:x}", i + 1),
                    // Two ports on one address.
                    (2, _) => format!("10.{}.{}.{}", i / 65536, (i / 512) % 256, (i / 2) % 256),
                    _ => format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256),
                };
                let mut x = inst(&format!("svc{s}"), &format!("svc{s}-{k}"), &ip, 10000 + (k % 50) as u16);
                x.tags = match k % 3 {
                    0 => vec!["v1".into(), "Canary".into()],
                    1 => vec!["v1".into()],
                    _ => vec!["v2".into(), format!("t{k}")],
                };
                x.weight = 1 + (k % 3) as u32;
                x.backup = k % 7 == 6;
                x.down = n == 0 || (k % 11 == 10);
                if k % 13 == 12 {
                    x.health = Health::Critical;
                }
                v.push(x);
            }
            s += 1;
        }
        v.truncate(10_000);
        v
    }

    type Rec = (String, RecordType, u32, String);

    /// The records of a message, names in lower case (compressed against a question in mixed
    /// case, names take its case).
    fn records(m: &Message) -> [Vec<Rec>; 3] {
        let f = |rs: &[Record]| {
            rs.iter().map(|r| (r.name.to_lowercase().to_ascii(), r.record_type(), r.ttl, r.data.to_string().to_ascii_lowercase())).collect()
        };
        [f(&m.answers), f(&m.authorities), f(&m.additionals)]
    }

    fn query_bytes(name: &str, t: RecordType, edns: Option<u16>, id: u16) -> Vec<u8> {
        let mut raw = query(name.to_ascii_lowercase().as_str(), t, edns);
        raw[..2].copy_from_slice(&id.to_be_bytes());
        // The name's bytes as given (hickory's encoder lower-cases them).
        let mut pos = 12;
        for label in name.trim_end_matches('.').split('.') {
            raw[pos + 1..pos + 1 + label.len()].copy_from_slice(label.as_bytes());
            pos += 1 + label.len();
        }
        raw
    }

    fn send(r: &Responder, raw: &[u8], s: &mut Scratch) -> Option<Vec<u8>> {
        match r.handle_udp(raw, "127.0.0.1:5000".parse().unwrap(), s) {
            UdpStep::Send { .. } => Some(s.out.clone()),
            _ => None,
        }
    }

    /// The precompiled path gives the answers the encoding path gives, for every name and type
    /// of a 10,000-instance snapshot: the same header, question (echoed with its case, 0x20),
    /// records in the same order (rotation included) and OPT record, in lower case and with
    /// the question's case randomised, without EDNS and with several payload sizes. Its
    /// answers are never larger (they also compress names against the question, which
    /// hickory's encoder does not), so TC is set only when the encoded answer has it too, and
    /// an answer that fits here only is compared with the whole encoded answer.
    #[test]
    fn precompiled_answers_equal_encoded_ones() {
        let snap = Arc::new(Snapshot::build(9, zone(), catalog()));
        assert_eq!(snap.stats.instances, 10_000);
        let fast = responder_with(snap.clone(), 1232);
        let mut slow = responder_with(snap.clone(), 1232);
        slow.set_precompiled(false);
        let mut unlimited = responder_with(snap.clone(), u16::MAX);
        unlimited.set_precompiled(false);
        let mut names = vec![
            "service.upsync.".to_string(),
            "ns.service.upsync.".into(),
            "addr.service.upsync.".into(),
            "_tcp.service.upsync.".into(),
            "10-100-0-1.addr.service.upsync.".into(),
            "nope.service.upsync.".into(),
            "a.b.c.service.upsync.".into(),
            "example.com.".into(),
            "1.0.100.10.in-addr.arpa.".into(),
        ];
        for (key, svc) in &snap.services {
            let svc_name = String::from_utf8(key.to_vec()).unwrap();
            names.push(format!("{svc_name}.service.upsync."));
            names.push(format!("_{svc_name}._tcp.service.upsync."));
            names.push(format!("_{svc_name}._udp.service.upsync."));
            names.push(format!("nope.{svc_name}.service.upsync."));
            names.push(format!("_{svc_name}._nope.service.upsync."));
            for tag in svc.tags.keys() {
                let tag = String::from_utf8(tag.to_vec()).unwrap();
                names.push(format!("{tag}.{svc_name}.service.upsync."));
                names.push(format!("_{svc_name}._{tag}.service.upsync."));
            }
        }
        let types = [RecordType::A, RecordType::AAAA, RecordType::SRV, RecordType::TXT, RecordType::ANY, RecordType::MX, RecordType::SOA];
        let payloads = [None, Some(512), Some(1232), Some(4096), Some(700), Some(100)];
        let (mut fs, mut ss, mut us) = (Scratch::default(), Scratch::default(), Scratch::default());
        let mut x: u64 = 0x1234_5678_9abc_def1;
        let (mut checked, mut precompiled, mut truncated) = (0, 0, 0);
        for (n, name) in names.iter().enumerate() {
            for (ti, &t) in types.iter().enumerate() {
                // A, AAAA, SRV with every payload size; the others with one.
                let sizes: &[Option<u16>] = if ti < 3 { &payloads } else { &payloads[(n + ti) % payloads.len()..][..1] };
                for &edns in sizes {
                    for randomise in [false, true] {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let asked: String = if randomise {
                            name.chars()
                                .enumerate()
                                .map(|(i, c)| if (x >> (i % 64)) & 1 == 1 { c.to_ascii_uppercase() } else { c })
                                .collect()
                        } else {
                            name.clone()
                        };
                        let raw = query_bytes(&asked, t, edns, x as u16);
                        let before = fs.rotation;
                        let (Some(a), Some(b)) = (send(&fast, &raw, &mut fs), send(&slow, &raw, &mut ss)) else {
                            continue;
                        };
                        assert_eq!(fs.rotation, ss.rotation, "{asked} {t}: same rotation");
                        let mut probe = Scratch { rotation: before, ..Scratch::default() };
                        precompiled += usize::from(fast.answer_precompiled(&raw, "127.0.0.1:5000".parse().unwrap(), &mut probe).is_some());
                        let (ma, mb) = (Message::from_vec(&a).unwrap(), Message::from_vec(&b).unwrap());
                        let what = format!("{asked} {t} edns {edns:?}");
                        let max = edns.map_or(512, |p| p.clamp(512, 1232)) as usize;
                        assert!(a.len() <= max, "{what}: {} bytes", a.len());
                        let mut meta = ma.metadata;
                        meta.truncation = mb.metadata.truncation;
                        assert_eq!(meta, mb.metadata, "{what}");
                        assert_eq!(ma.queries[0].name().to_ascii(), asked, "{what}: question echoed as asked");
                        assert_eq!(ma.queries, mb.queries, "{what}");
                        assert_eq!(ma.edns, mb.edns, "{what}");
                        if ma.metadata.truncation == mb.metadata.truncation {
                            assert_eq!(records(&ma), records(&mb), "{what}");
                            // Never larger: names compress against the question too.
                            assert!(a.len() <= b.len(), "{what}: {} > {} bytes", a.len(), b.len());
                        } else {
                            // hickory does not compress against the question: an answer may
                            // fit here and not there, never the other way.
                            assert!(!ma.metadata.truncation, "{what}: truncated here only");
                            us.rotation = before;
                            let full = send(&unlimited, &query_bytes(name, t, Some(u16::MAX), x as u16), &mut us).unwrap();
                            assert_eq!(records(&ma), records(&Message::from_vec(&full).unwrap()), "{what}: against the whole answer");
                        }
                        truncated += usize::from(ma.metadata.truncation);
                        checked += 1;
                    }
                }
            }
        }
        eprintln!("{checked} answers compared, {precompiled} of them precompiled, {truncated} truncated");
        assert!(checked > 100_000 && precompiled > checked / 4 && truncated > 100, "{checked} {precompiled} {truncated}");
    }
}
