//! upsync-dns facing hostile clients: a spoofed-source UDP flood (response rate limiting,
//! amplification measured), `ANY` and answer sizes, a flood of idle TCP connections, accept
//! loops out of file descriptors, and an open `allow_recursion` warned about.
use std::io::{ErrorKind, Read};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use hickory_proto::op::Message;
use hickory_proto::rr::RecordType;
use serde_json::json;
use upsync_tests::consul::Consul;
use upsync_tests::dns::{dig, query_bytes, send_raw_from, wait_dig, DnsOptions, DnsServer};
use upsync_tests::{wait_for_value, wait_until, TestDir};

/// Registers `n` instances of `name` on an external node, in catalog transactions.
fn register_many(consul: &Consul, name: &str, n: usize, third_octet: u8) {
    let node = format!("ext-{name}");
    let mut ops = vec![json!({"Node": {"Verb": "set", "Node": {"Node": node, "Address": "127.0.0.99"}}})];
    ops.extend((0..n).map(|i| {
        json!({"Service": {"Verb": "set", "Node": node,
            "Service": {"ID": format!("{name}-{i}"), "Service": name, "Address": format!("127.{third_octet}.{}.{}", i / 200, i % 200 + 1), "Port": 10000 + i}}})
    }));
    for chunk in ops.chunks(64) {
        let (status, body) =
            consul.api("PUT", "/v1/txn", Some(serde_json::Value::from(chunk.to_vec()).to_string().as_bytes())).expect("txn");
        assert_eq!(status, 200, "txn: {body}");
    }
}

/// What the flooding sockets sent and got back.
#[derive(Debug, Default)]
struct Flood {
    queries: u64,
    bytes_in: u64,
    answers: u64,
    bytes_out: u64,
    truncated: u64,
}

/// Sends `rounds` queries from each of `sources` (spoofed-looking loopback addresses), reading
/// whatever comes back without blocking, then waits `drain` for the stragglers.
fn flood(server: SocketAddr, sources: &[IpAddr], query: &[u8], rounds: usize, drain: Duration) -> Flood {
    let socks: Vec<UdpSocket> = sources
        .iter()
        .map(|ip| {
            let s = UdpSocket::bind(SocketAddr::new(*ip, 0)).unwrap_or_else(|e| panic!("binding {ip}: {e}"));
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    let mut f = Flood::default();
    let mut buf = vec![0u8; 65535];
    let mut collect = |socks: &[UdpSocket], f: &mut Flood| {
        for s in socks {
            loop {
                match s.recv(&mut buf) {
                    Ok(n) => {
                        f.answers += 1;
                        f.bytes_out += n as u64;
                        if n > 2 && buf[2] & 0x02 != 0 {
                            f.truncated += 1;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => break,
                }
            }
        }
    };
    for round in 0..rounds {
        for s in &socks {
            if s.send_to(query, server).is_ok() {
                f.queries += 1;
                f.bytes_in += query.len() as u64;
            }
        }
        collect(&socks, &mut f);
        // Paced so that neither side's socket buffers overflow: every query is answered or
        // refused by the server, not lost on the way.
        if round % 4 == 3 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let end = Instant::now() + drain;
    while Instant::now() < end {
        collect(&socks, &mut f);
        std::thread::sleep(Duration::from_millis(5));
    }
    f
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Item 6: a flood from many addresses of 127.9/16 (outside `allow_recursion`, which is only
/// 127.0.0.1 here) asking for a ~500-byte SRV answer with a ~50-byte query. Without RRL every
/// query is answered (about 10x the bytes); with it, bytes out stay below bytes in, while a
/// client of another prefix, a TCP client inside the flooded prefix and an allowed client keep
/// their answers.
#[test]
fn spoofed_flood_is_not_amplified_and_legitimate_clients_keep_answers() {
    let dir = TestDir::new("dns_rrl_flood");
    let consul = Consul::start(dir.path());
    let dns = DnsServer::start(
        dir.path(),
        &consul.http_addr(),
        DnsOptions { config: Some("[forward]\nallow_recursion = [\"127.0.0.1/32\"]\n".into()), ..Default::default() },
    );
    register_many(&consul, "big", 10, 2);
    register_many(&consul, "wide", 150, 3);
    wait_dig(&dns, "10 SRV records", &["big.service.upsync.", "SRV"], |d| d.answer.len() == 10);
    wait_dig(&dns, "150 A records", &["wide.service.upsync.", "A", "+tcp"], |d| d.answer.len() == 150);

    // ANY is answered with one HINFO (RFC 8482), over UDP and TCP.
    let any = dig(dns.addr(), &["wide.service.upsync.", "ANY"]);
    assert_eq!((any.answer.len(), any.answer.first().map(|r| r.rtype.as_str())), (1, Some("HINFO")), "{}", any.raw);
    assert!(any.answer[0].data.contains("RFC8482"), "{}", any.raw);
    let any = dig(dns.addr(), &["wide.service.upsync.", "ANY", "+tcp"]);
    assert_eq!(any.answer.len(), 1, "{}", any.raw);
    // A UDP answer is at most 1232 bytes whatever the client offers (TC beyond).
    let raw = send_raw_from(
        ip("127.0.0.1"),
        dns.addr(),
        &query_bytes(7, "wide.service.upsync.", RecordType::A, Some(65000)),
        Duration::from_secs(3),
    )
    .expect("an answer");
    let m = Message::from_vec(&raw).unwrap();
    assert!(raw.len() <= 1232 && m.metadata.truncation, "{} bytes, TC {}", raw.len(), m.metadata.truncation);
    assert_eq!(m.edns.as_ref().map(|e| e.max_payload()), Some(1232));

    // The flood: 8 prefixes (127.9.0.0/24 .. 127.9.7.0/24) x 8 addresses, 150 rounds.
    let sources: Vec<IpAddr> = (0..8u8).flat_map(|p| (1..=8u8).map(move |h| IpAddr::V4(Ipv4Addr::new(127, 9, p, h)))).collect();
    let query = query_bytes(0x5151, "big.service.upsync.", RecordType::SRV, Some(4096));
    let server = dns.addr();
    let flooder = std::thread::spawn(move || {
        let start = Instant::now();
        let f = flood(server, &sources, &query, 150, Duration::from_millis(500));
        (f, start.elapsed())
    });

    // Meanwhile: a client of another prefix (127.10.0.1), at 20 queries a second at most,
    // one at a time; a TCP client inside a flooded prefix; an allowed client.
    let legit_query = query_bytes(0x4242, "big.service.upsync.", RecordType::SRV, Some(1232));
    let (mut legit_sent, mut legit_answered) = (0, 0);
    let (mut tcp_ok, mut allowed_ok) = (0, 0);
    while !flooder.is_finished() {
        legit_sent += 1;
        if let Some(a) = send_raw_from(ip("127.10.0.1"), dns.addr(), &legit_query, Duration::from_secs(2)) {
            let m = Message::from_vec(&a).expect("the answer parses");
            if m.answers.len() == 10 {
                legit_answered += 1;
            }
        }
        let tcp = dig(dns.addr(), &["-b", "127.9.3.200", "+tcp", "big.service.upsync.", "SRV"]);
        tcp_ok += usize::from(tcp.answer.len() == 10);
        allowed_ok += usize::from(dig(dns.addr(), &["big.service.upsync.", "SRV"]).answer.len() == 10);
        std::thread::sleep(Duration::from_millis(50));
    }
    let (f, took) = flooder.join().expect("the flood thread");
    let ratio = f.bytes_out as f64 / f.bytes_in as f64;
    println!(
        "RRL flood: {} queries ({} bytes) from 64 addresses in 8 /24s over {:.2} s; {} answers ({} truncated), {} bytes: bytes out / bytes in = {ratio:.3}",
        f.queries,
        f.bytes_in,
        took.as_secs_f64(),
        f.answers,
        f.truncated,
        f.bytes_out
    );
    println!(
        "legitimate clients during the flood: other prefix over UDP {legit_answered}/{legit_sent} answered; flooded prefix over TCP {tcp_ok}/{legit_sent}; allowed client {allowed_ok}/{legit_sent}"
    );
    assert!(f.queries >= 9000, "the flood sent {} queries", f.queries);
    assert!(ratio < 1.5, "amplification: {ratio:.2} bytes out per byte in ({f:?})");
    assert!(f.truncated > 0, "some limited answers slip as TC=1: {f:?}");
    assert!(legit_sent >= 1);
    assert_eq!(legit_answered, legit_sent, "a client of another prefix keeps every answer");
    assert_eq!(tcp_ok, legit_sent, "TCP is never rate limited");
    assert_eq!(allowed_ok, legit_sent, "allowed clients are exempt");

    let dropped = dns.metric("upsync_dns_rrl_dropped_total").unwrap_or(0.0);
    let slipped = dns.metric("upsync_dns_rrl_slipped_total").unwrap_or(0.0);
    assert!(dropped > 1000.0 && slipped > 1000.0, "RRL counters: dropped {dropped}, slipped {slipped}\n{}", dns.metrics());
    // A real resolver in a flooded prefix: after a slip, dig retries over TCP and gets the answer.
    let d = dig(dns.addr(), &["-b", "127.9.0.1", "+tries=5", "+time=1", "big.service.upsync.", "SRV"]);
    assert_eq!(d.answer.len(), 10, "{}", d.raw);
}

/// Item 7: more idle TCP connections than `max_tcp_connections`: the idlest are closed at
/// once for the new ones (not after the idle timeout), UDP keeps answering, a new TCP client is
/// served, and every idle connection is closed after `tcp_idle_timeout`.
#[test]
fn idle_tcp_connections_are_bounded_and_shed() {
    let dir = TestDir::new("dns_tcp_flood");
    let consul = Consul::start(dir.path());
    let dns = DnsServer::start(
        dir.path(),
        &consul.http_addr(),
        DnsOptions { config: Some("[dns]\nmax_tcp_connections = 16\ntcp_idle_timeout = \"6s\"\n".into()), ..Default::default() },
    );
    consul.register_service(&json!({"ID": "w1", "Name": "web", "Address": "127.0.0.61", "Port": 80}));
    wait_dig(&dns, "web registered", &["web.service.upsync.", "A"], |d| d.data("A") == ["127.0.0.61"]);

    // A client sending one byte of a query and nothing more: not idle (never shed), closed
    // when the query is not complete within the idle timeout.
    let mut slow = TcpStream::connect(dns.addr()).expect("TCP connect");
    std::io::Write::write_all(&mut slow, &[0]).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let start = Instant::now();
    let mut idle: Vec<TcpStream> = (0..48).map(|_| TcpStream::connect(dns.addr()).expect("TCP connect")).collect();
    for s in &idle {
        s.set_nonblocking(true).unwrap();
    }
    // Closed by the server: a read gives EOF (or a reset).
    let closed = |idle: &mut Vec<TcpStream>| {
        idle.iter_mut()
            .filter(|s| {
                let mut b = [0u8; 1];
                match (&**s).read(&mut b) {
                    Ok(0) => true,
                    Err(e) => e.kind() != ErrorKind::WouldBlock,
                    Ok(_) => false,
                }
            })
            .count()
    };
    let within = Duration::from_secs(3).saturating_sub(start.elapsed());
    let shed = wait_for_value(within, || closed(&mut idle), |&n| n >= 32).unwrap_or_else(|t| t.last);
    assert!(start.elapsed() < Duration::from_secs(5), "checked before the idle timeout");
    assert!(shed >= 32, "48 idle connections with a bound of 16: {shed} closed before the idle timeout");
    let d = dns.dig(&["web.service.upsync.", "A"]);
    assert_eq!(d.data("A"), ["127.0.0.61"], "UDP still answers: {}", d.raw);
    let d = dns.dig(&["+tcp", "web.service.upsync.", "A"]);
    assert_eq!(d.data("A"), ["127.0.0.61"], "a new TCP client is served: {}", d.raw);
    assert!(dns.metric("upsync_dns_tcp_shed_total").unwrap_or(0.0) >= 32.0, "{}", dns.metrics());
    assert!(dns.metric("upsync_dns_tcp_connections").unwrap_or(99.0) <= 16.0, "{}", dns.metrics());
    // The rest are closed by the idle timeout.
    wait_until("every idle connection closed", Duration::from_secs(30), || closed(&mut idle) == 48);
    let mut b = [0u8; 1];
    assert!(matches!(slow.read(&mut b), Ok(0) | Err(_)), "the slow client is closed");
    assert!(start.elapsed() < Duration::from_secs(25), "closed by the 6 s timeout, not by the test's own");
}

/// CPU time (user + system) of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn count_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Item 7: out of file descriptors (EMFILE), the DNS-over-TCP and HTTP accept loops pause
/// instead of spinning (a busy loop would burn a core), log one warning each, and accept again
/// once descriptors are free; UDP answers throughout.
#[test]
fn accept_loops_back_off_when_out_of_file_descriptors() {
    let dir = TestDir::new("dns_emfile");
    let consul = Consul::start(dir.path());
    let mut dns = DnsServer::start(
        dir.path(),
        &consul.http_addr(),
        DnsOptions { nofile: Some(64), config: Some("[dns]\nmax_tcp_connections = 1000\n".into()), ..Default::default() },
    );
    consul.register_service(&json!({"ID": "w1", "Name": "web", "Address": "127.0.0.61", "Port": 80}));
    wait_dig(&dns, "web registered", &["web.service.upsync.", "A"], |d| d.data("A") == ["127.0.0.61"]);
    let pid = dns.pid();

    // Fill the descriptor table with idle connections, DNS and HTTP.
    let mut held: Vec<TcpStream> = Vec::new();
    for _ in 0..80 {
        held.push(TcpStream::connect(dns.addr()).expect("TCP connect (the kernel completes it)"));
    }
    wait_until("the descriptor table full", Duration::from_secs(10), || count_fds(pid) >= 63);
    // Only now the HTTP connections: with no descriptor left, the HTTP accept loop meets EMFILE
    // (connected earlier, they could be accepted before the table filled up).
    let metrics_addr = SocketAddr::from(([127, 0, 0, 1], dns.metrics_port));
    for _ in 0..4 {
        held.push(TcpStream::connect(metrics_addr).expect("TCP connect to the HTTP endpoint"));
    }
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(pid) - before;
    println!("EMFILE: {used} clock ticks of CPU in 2 s");
    // A spinning accept loop uses a whole core: ~200 ticks (at 100 Hz) in 2 s.
    assert!(used < 30, "the server used {used} ticks of CPU in 2 s while out of descriptors (spinning?)");
    let d = dns.dig(&["web.service.upsync.", "A"]);
    assert_eq!(d.data("A"), ["127.0.0.61"], "UDP still answers: {}", d.raw);
    wait_until("the DNS accept loop warned", Duration::from_secs(10), || dns.log().contains("cannot accept connections"));
    let log = dns.log();
    let warnings = log.lines().filter(|l| l.contains("DNS over TCP on") && l.contains("cannot accept connections")).count();
    assert_eq!(warnings, 1, "one warning per burst:\n{log}");
    assert!(log.contains("cannot accept connections") && log.contains("Too many open files"), "{log}");
    wait_until("the HTTP accept loop warned", Duration::from_secs(10), || dns.log().contains("the HTTP endpoint on"));

    drop(held);
    wait_until("accepting again", Duration::from_secs(20), || dns.log().contains("accepting connections again"));
    let d = dns.dig(&["+tcp", "web.service.upsync.", "A"]);
    assert_eq!(d.data("A"), ["127.0.0.61"], "a TCP client is served again: {}", d.raw);
    wait_until("metrics served again", Duration::from_secs(20), || dns.metric("upsync_dns_accept_errors_total").unwrap_or(0.0) >= 2.0);
    assert!(dns.is_running());
}

/// Item 7: `allow_recursion` open to every address is warned about at start (and by
/// --check-config).
#[test]
fn allow_recursion_open_to_everyone_is_warned_about() {
    let dir = TestDir::new("dns_open_recursion");
    let consul = Consul::start(dir.path());
    let dns = DnsServer::start(
        dir.path(),
        &consul.http_addr(),
        DnsOptions { args: vec!["--allow-recursion".into(), "0.0.0.0/0,::/0".into()], ..Default::default() },
    );
    let log = dns.log();
    assert!(log.contains("WARN") && log.contains("allow_recursion includes 0.0.0.0/0"), "{log}");
    assert!(log.contains("allow_recursion includes ::/0"), "{log}");
    let quiet = DnsServer::start(dir.path(), &consul.http_addr(), DnsOptions::default());
    assert!(!quiet.log().contains("allow_recursion includes"), "{}", quiet.log());
}
