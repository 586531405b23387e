//! Prometheus metrics. The per-query counters and the latency histogram are sharded: each
//! UDP thread owns a [`Shard`] of plain atomics that only it writes (no cache line bouncing
//! between cores at 100k+ queries a second); a scrape sums the shards. Everything else (the
//! Consul feed's state) uses prometheus-client's own metric types.
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

const QTYPES: [&str; 9] = ["A", "AAAA", "SRV", "PTR", "SOA", "NS", "TXT", "ANY", "other"];
const RCODES: [&str; 7] = ["NOERROR", "NXDOMAIN", "REFUSED", "FORMERR", "SERVFAIL", "NOTIMP", "other"];
const PROTOS: [&str; 2] = ["udp", "tcp"];
/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 15] = [0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.0];

fn qtype_index(t: RecordType) -> usize {
    match t {
        RecordType::A => 0,
        RecordType::AAAA => 1,
        RecordType::SRV => 2,
        RecordType::PTR => 3,
        RecordType::SOA => 4,
        RecordType::NS => 5,
        RecordType::TXT => 6,
        RecordType::ANY => 7,
        _ => 8,
    }
}

fn rcode_index(r: ResponseCode) -> usize {
    match r {
        ResponseCode::NoError => 0,
        ResponseCode::NXDomain => 1,
        ResponseCode::Refused => 2,
        ResponseCode::FormErr => 3,
        ResponseCode::ServFail => 4,
        ResponseCode::NotImp => 5,
        _ => 6,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Udp = 0,
    Tcp = 1,
}

/// Why a packet got no answer at all.
#[derive(Clone, Copy, Debug)]
pub enum Drop {
    /// Shorter than a DNS header, or a response (QR=1): answering could reflect traffic.
    Malformed = 0,
    Response = 1,
    /// Beyond the client prefix's response rate (RRL), not slipped.
    RateLimited = 2,
}

/// Counters written by one thread.
#[derive(Debug)]
pub struct Shard {
    queries: [[[AtomicU64; RCODES.len()]; QTYPES.len()]; PROTOS.len()],
    latency: [AtomicU64; BUCKETS.len() + 1],
    latency_sum_ns: AtomicU64,
    truncated: AtomicU64,
    dropped: [AtomicU64; 3],
    slipped: AtomicU64,
    forwarded: AtomicU64,
    tcp_shed: AtomicU64,
    accept_errors: AtomicU64,
}

impl Default for Shard {
    fn default() -> Self {
        Shard {
            queries: std::array::from_fn(|_| std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0)))),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            latency_sum_ns: AtomicU64::new(0),
            truncated: AtomicU64::new(0),
            dropped: std::array::from_fn(|_| AtomicU64::new(0)),
            slipped: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            tcp_shed: AtomicU64::new(0),
            accept_errors: AtomicU64::new(0),
        }
    }
}

impl Shard {
    /// One answered query, `took` from receiving it to handing the answer to the socket.
    pub fn answered(&self, proto: Proto, qtype: RecordType, rcode: ResponseCode, took: Duration) {
        self.queries[proto as usize][qtype_index(qtype)][rcode_index(rcode)].fetch_add(1, Relaxed);
        let secs = took.as_secs_f64();
        let b = BUCKETS.iter().position(|&ub| secs <= ub).unwrap_or(BUCKETS.len());
        self.latency[b].fetch_add(1, Relaxed);
        self.latency_sum_ns.fetch_add(took.as_nanos().min(u128::from(u64::MAX)) as u64, Relaxed);
    }

    pub fn truncated(&self) {
        self.truncated.fetch_add(1, Relaxed);
    }

    pub fn dropped(&self, why: Drop) {
        self.dropped[why as usize].fetch_add(1, Relaxed);
    }

    pub fn forwarded(&self) {
        self.forwarded.fetch_add(1, Relaxed);
    }

    /// A rate-limited response sent as an empty truncated answer (RRL slip).
    pub fn slipped(&self) {
        self.slipped.fetch_add(1, Relaxed);
    }

    /// An idle TCP connection closed to make room for a new one.
    pub fn tcp_shed(&self) {
        self.tcp_shed.fetch_add(1, Relaxed);
    }

    /// An `accept` that failed for lack of resources (EMFILE, ENFILE, ENOBUFS, ENOMEM).
    pub fn accept_error(&self) {
        self.accept_errors.fetch_add(1, Relaxed);
    }
}

/// All shards, summed at scrape time.
#[derive(Debug, Default)]
struct Shards(Mutex<Vec<Arc<Shard>>>);

impl Shards {
    fn sum(&self, f: impl Fn(&Shard) -> u64) -> u64 {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|s| f(s)).sum()
    }
}

impl Collector for Shards {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut m = encoder.encode_descriptor(
            "upsync_dns_queries",
            "DNS queries answered, by protocol, query type and response code",
            None,
            MetricType::Counter,
        )?;
        for (p, proto) in PROTOS.iter().enumerate() {
            for (t, qtype) in QTYPES.iter().enumerate() {
                for (r, rcode) in RCODES.iter().enumerate() {
                    let v = self.sum(|s| s.queries[p][t][r].load(Relaxed));
                    if v > 0 {
                        let labels = [("proto", *proto), ("type", *qtype), ("rcode", *rcode)];
                        ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
                    }
                }
            }
        }
        let buckets: Vec<(f64, u64)> =
            (0..=BUCKETS.len()).map(|i| (BUCKETS.get(i).copied().unwrap_or(f64::MAX), self.sum(|s| s.latency[i].load(Relaxed)))).collect();
        let count = buckets.iter().map(|(_, c)| c).sum();
        let sum = self.sum(|s| s.latency_sum_ns.load(Relaxed)) as f64 / 1e9;
        let mut h = encoder.encode_descriptor(
            "upsync_dns_query_duration_seconds",
            "Time from receiving a query to sending its answer (forwarded queries include the upstream)",
            None,
            MetricType::Histogram,
        )?;
        h.encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)?;
        let simple = [
            ("upsync_dns_truncated", "UDP answers sent truncated (TC) because they did not fit", self.sum(|s| s.truncated.load(Relaxed))),
            ("upsync_dns_forwarded", "Queries forwarded to the upstream resolvers", self.sum(|s| s.forwarded.load(Relaxed))),
            (
                "upsync_dns_rrl_dropped",
                "UDP responses not sent: beyond the client prefix's response rate (RRL)",
                self.sum(|s| s.dropped[Drop::RateLimited as usize].load(Relaxed)),
            ),
            (
                "upsync_dns_rrl_slipped",
                "UDP responses beyond the client prefix's rate sent as empty truncated answers (RRL slip)",
                self.sum(|s| s.slipped.load(Relaxed)),
            ),
            ("upsync_dns_tcp_shed", "Idle TCP connections closed to make room for new ones", self.sum(|s| s.tcp_shed.load(Relaxed))),
            (
                "upsync_dns_accept_errors",
                "Failed accepts for lack of resources (EMFILE, ENFILE, ENOBUFS, ENOMEM), DNS over TCP and HTTP",
                self.sum(|s| s.accept_errors.load(Relaxed)),
            ),
        ];
        for (name, help, v) in simple {
            ConstCounter::new(v).encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)?;
        }
        let mut d =
            encoder.encode_descriptor("upsync_dns_dropped", "Packets dropped without an answer, by reason", None, MetricType::Counter)?;
        for (i, reason) in ["malformed", "response"].iter().enumerate() {
            ConstCounter::new(self.sum(|s| s.dropped[i].load(Relaxed))).encode(d.encode_family(&[("reason", *reason)])?)?;
        }
        Ok(())
    }
}

/// The Consul feed's state, as gauges and counters.
#[derive(Debug, Default)]
pub struct FeedMetrics {
    pub snapshot_index: Gauge,
    pub services: Gauge,
    pub instances: Gauge,
    pub usable_instances: Gauge,
    pub consul_up: Gauge,
    pub consul_errors: Family<[(&'static str, &'static str); 1], Counter>,
    pub catalog_reads: Counter,
    pub catalog_read_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub catalog_read_bytes: Gauge,
    pub snapshot_builds: Counter,
    /// Services with a blocking query of their own (`[consul] hot_services`).
    pub hot_services: Gauge,
    /// Seconds since the Unix epoch of the last snapshot swap.
    pub snapshot_swapped: Gauge,
}

/// The instants behind the staleness gauges (nanoseconds since `epoch`); the gauges depend on
/// the time of the scrape, so they are computed then.
#[derive(Debug)]
struct Freshness {
    epoch: Instant,
    last_ok_ns: AtomicI64,
    snapshot_built_ns: AtomicI64,
    consul_up: Gauge,
}

impl Freshness {
    fn at(&self, ns: &AtomicI64) -> Instant {
        self.epoch + Duration::from_nanos(ns.load(Relaxed).max(0) as u64)
    }

    fn store(&self, ns: &AtomicI64, t: Instant) {
        ns.store(t.saturating_duration_since(self.epoch).as_nanos().min(i64::MAX as u128) as i64, Relaxed);
    }

    fn staleness(&self, now: Instant) -> Duration {
        if self.consul_up.get() == 1 {
            return Duration::ZERO;
        }
        now.saturating_duration_since(self.at(&self.last_ok_ns))
    }
}

impl Collector for Freshness {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let now = Instant::now();
        for (name, help, v) in [
            (
                "upsync_dns_snapshot_stale_seconds",
                "Seconds since Consul last answered while it is unreachable (0 while it answers): how old the data served may be",
                self.staleness(now).as_secs_f64(),
            ),
            (
                "upsync_dns_snapshot_age_seconds",
                "Seconds since the snapshot being served was built",
                now.saturating_duration_since(self.at(&self.snapshot_built_ns)).as_secs_f64(),
            ),
        ] {
            ConstGauge::new(v).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)?;
        }
        Ok(())
    }
}

/// Everything exported on /metrics.
#[derive(Debug)]
pub struct Metrics {
    shards: Arc<Shards>,
    pub feed: Arc<FeedMetrics>,
    /// Shared shard for TCP connections and forwarded queries (not on the UDP hot path).
    pub shared: Arc<Shard>,
    fresh: Arc<Freshness>,
    /// Open DNS-over-TCP connections.
    pub tcp_connections: Gauge,
    registry: Registry,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let shards = Arc::new(Shards::default());
        let feed = Arc::new(FeedMetrics::default());
        let mut registry = Registry::default();
        registry.register_collector(Box::new(shards.clone()));
        let f = &feed;
        registry.register("upsync_dns_snapshot_index", "Consul index of the snapshot being served", f.snapshot_index.clone());
        registry.register("upsync_dns_snapshot_services", "Services in the snapshot", f.services.clone());
        registry.register("upsync_dns_snapshot_instances", "Service instances in the snapshot (all health states)", f.instances.clone());
        registry.register("upsync_dns_snapshot_usable_instances", "Instances served (passing, not down)", f.usable_instances.clone());
        registry.register(
            "upsync_dns_consul_up",
            "1 while every Consul watch succeeds, 0 while answering from the last snapshot",
            f.consul_up.clone(),
        );
        registry.register("upsync_dns_consul_errors", "Failed Consul requests, by watch", f.consul_errors.clone());
        registry.register("upsync_dns_catalog_reads", "Full reads of the catalog (node dump)", f.catalog_reads.clone());
        registry.register(
            "upsync_dns_catalog_read_duration_seconds",
            "Duration of the last full catalog read (request and decoding)",
            f.catalog_read_seconds.clone(),
        );
        registry.register("upsync_dns_catalog_read_bytes", "Size of the last full catalog read", f.catalog_read_bytes.clone());
        registry.register("upsync_dns_snapshot_builds", "Snapshots built and swapped in", f.snapshot_builds.clone());
        registry.register(
            "upsync_dns_hot_services",
            "Recently changed services watched by a blocking query of their own",
            f.hot_services.clone(),
        );
        registry.register(
            "upsync_dns_snapshot_swapped_timestamp_seconds",
            "Unix time of the last snapshot swap",
            f.snapshot_swapped.clone(),
        );
        let fresh = Arc::new(Freshness {
            epoch: Instant::now(),
            last_ok_ns: AtomicI64::new(0),
            snapshot_built_ns: AtomicI64::new(0),
            consul_up: f.consul_up.clone(),
        });
        registry.register_collector(Box::new(fresh.clone()));
        let tcp_connections = Gauge::default();
        registry.register("upsync_dns_tcp_connections", "Open DNS-over-TCP connections", tcp_connections.clone());
        let shared = Arc::new(Shard::default());
        shards.0.lock().unwrap_or_else(|e| e.into_inner()).push(shared.clone());
        Arc::new(Metrics { shards, feed, shared, fresh, tcp_connections, registry })
    }

    /// A shard for one thread.
    pub fn shard(&self) -> Arc<Shard> {
        let s = Arc::new(Shard::default());
        self.shards.0.lock().unwrap_or_else(|e| e.into_inner()).push(s.clone());
        s
    }

    /// Consul answered (any watch).
    pub fn consul_ok(&self, at: Instant) {
        self.fresh.store(&self.fresh.last_ok_ns, at);
    }

    pub fn snapshot_built(&self, at: Instant) {
        self.fresh.store(&self.fresh.snapshot_built_ns, at);
    }

    /// How long since Consul last answered, when it is down (0 while it is up).
    pub fn staleness(&self, now: Instant) -> Duration {
        self.fresh.staleness(now)
    }

    /// The text exposition for /metrics.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_summed_at_scrape() {
        let m = Metrics::new();
        let (a, b) = (m.shard(), m.shard());
        a.answered(Proto::Udp, RecordType::A, ResponseCode::NoError, Duration::from_micros(20));
        b.answered(Proto::Udp, RecordType::A, ResponseCode::NoError, Duration::from_micros(20));
        b.answered(Proto::Tcp, RecordType::SRV, ResponseCode::NXDomain, Duration::from_millis(3));
        m.shared.dropped(Drop::Malformed);
        m.feed.consul_errors.get_or_create(&[("watch", "catalog")]).inc();
        let text = m.render();
        assert!(text.contains(r#"upsync_dns_queries_total{proto="udp",type="A",rcode="NOERROR"} 2"#), "{text}");
        assert!(text.contains(r#"upsync_dns_queries_total{proto="tcp",type="SRV",rcode="NXDOMAIN"} 1"#), "{text}");
        assert!(text.contains("upsync_dns_query_duration_seconds_count 3"), "{text}");
        assert!(text.contains(r#"upsync_dns_query_duration_seconds_bucket{le="0.000025"} 2"#), "{text}");
        assert!(text.contains(r#"upsync_dns_dropped_total{reason="malformed"} 1"#), "{text}");
        assert!(text.contains(r#"upsync_dns_consul_errors_total{watch="catalog"} 1"#), "{text}");
        assert!(text.contains("upsync_dns_snapshot_stale_seconds"), "{text}");
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
    }

    #[test]
    fn staleness_counts_only_while_consul_is_down() {
        let m = Metrics::new();
        let t0 = Instant::now();
        m.consul_ok(t0);
        m.feed.consul_up.set(1);
        assert_eq!(m.staleness(t0 + Duration::from_secs(5)), Duration::ZERO);
        m.feed.consul_up.set(0);
        assert!(m.staleness(t0 + Duration::from_secs(5)) >= Duration::from_secs(4));
    }
}
