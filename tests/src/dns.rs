//! `upsync-dns` under test, and real DNS clients to question it: `dig` (parsed), hickory's
//! client (UDP and TCP), and raw datagrams for malformed input.
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::time::Duration;

use hickory_net::client::{Client, ClientHandle};
use hickory_net::runtime::TokioRuntimeProvider;
use hickory_net::tcp::TcpClientStream;
use hickory_net::udp::UdpClientStream;
use hickory_proto::op::Message;
use hickory_proto::rr::{DNSClass, Name, RecordType};

use crate::net::{free_port, http_get};
use crate::proc::Proc;

/// How to start the server.
#[derive(Clone, Debug, Default)]
pub struct DnsOptions {
    /// TOML written to `upsync-dns.toml` and passed with `--config`.
    pub config: Option<String>,
    /// More command-line arguments.
    pub args: Vec<String>,
    /// Do not wait for the first snapshot (e.g. when Consul is down on purpose).
    pub no_wait_synced: bool,
    /// Run it with this open-file limit (soft and hard, through util-linux's `prlimit`).
    pub nofile: Option<u64>,
}

/// A running `upsync-dns` on free loopback ports; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct DnsServer {
    proc: Option<Proc>,
    pub port: u16,
    pub metrics_port: u16,
    log: PathBuf,
}

impl DnsServer {
    /// Starts `upsync-dns --consul CONSUL --listen 127.0.0.1:P --metrics-listen 127.0.0.1:M`
    /// with `opts`, and waits until it has read Consul (its /health says 200).
    pub fn start(dir: &Path, consul_http: &str, opts: DnsOptions) -> DnsServer {
        let mut last = String::new();
        for attempt in 0..3 {
            let (port, metrics_port) = (free_port(), free_port());
            let log = dir.join(format!("upsync-dns-{port}.log"));
            let mut cmd = match opts.nofile {
                Some(n) => {
                    let mut c = Command::new("prlimit");
                    c.arg(format!("--nofile={n}:{n}")).arg("--").arg(crate::paths::workspace_bin("upsync-dns"));
                    c
                }
                None => Command::new(crate::paths::workspace_bin("upsync-dns")),
            };
            cmd.args(["--consul", consul_http])
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
                .env("RUST_LOG", "info,upsync_dns=debug,hickory_server=warn,hickory_net=warn,hickory_resolver=warn");
            if let Some(toml) = &opts.config {
                let path = dir.join(format!("upsync-dns-{port}.toml"));
                std::fs::write(&path, toml).expect("writing the upsync-dns config");
                cmd.arg("--config").arg(&path);
            }
            cmd.args(&opts.args);
            let proc = Proc::spawn("upsync-dns", cmd, &log).expect("starting upsync-dns");
            let mut s = DnsServer { proc: Some(proc), port, metrics_port, log };
            match s.wait_started(!opts.no_wait_synced) {
                Ok(()) => return s,
                Err(e) => {
                    last = format!("attempt {attempt}: {e}");
                    s.kill();
                }
            }
        }
        panic!("upsync-dns did not start: {last}");
    }

    fn wait_started(&mut self, synced: bool) -> anyhow::Result<()> {
        let start = std::time::Instant::now();
        loop {
            let code = http_get(&self.url("/health")).map(|(c, _)| c).unwrap_or(0);
            if code == 200 || (!synced && code == 503) {
                return Ok(());
            }
            let log = self.log();
            if !self.is_running() || log.contains("Address already in use") {
                anyhow::bail!("upsync-dns exited or could not bind; its log:\n{log}");
            }
            if start.elapsed() > Duration::from_secs(60) {
                anyhow::bail!("upsync-dns not ready after 60 s (GET /health: {code}); its log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.metrics_port)
    }

    /// The Prometheus text of /metrics.
    pub fn metrics(&self) -> String {
        http_get(&self.url("/metrics")).map(|(_, b)| b).unwrap_or_default()
    }

    /// The value of one metric line (`name{labels}` exactly as exported), if present.
    pub fn metric(&self, series: &str) -> Option<f64> {
        self.metrics().lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
    }

    /// /health as JSON.
    pub fn health(&self) -> serde_json::Value {
        http_get(&self.url("/health")).ok().and_then(|(_, b)| serde_json::from_str(&b).ok()).unwrap_or_default()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.proc.as_ref().map(|p| p.pid()).unwrap_or(0)
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().map(|p| p.is_running()).unwrap_or(false)
    }

    /// `dig @127.0.0.1 -p PORT ARGS...`.
    pub fn dig(&self, args: &[&str]) -> Dig {
        dig(self.addr(), args)
    }

    /// Sends `sig` and waits up to `grace` for the exit; its status.
    pub fn signal_and_wait(&mut self, sig: i32, grace: Duration) -> Option<std::process::ExitStatus> {
        let p = self.proc.as_mut()?;
        p.signal(sig);
        p.wait_exit(grace)
    }

    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop_with(libc::SIGTERM, Duration::from_secs(10));
        }
    }
}

/// One resource record of dig's output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rr {
    pub name: String,
    pub ttl: u32,
    pub rtype: String,
    pub data: String,
}

/// dig's answer, parsed from `+noall +comments +answer +authority +additional`.
#[derive(Clone, Debug, Default)]
pub struct Dig {
    /// `NOERROR`, `NXDOMAIN`, ...; empty when dig got no answer at all.
    pub status: String,
    pub flags: Vec<String>,
    pub answer: Vec<Rr>,
    pub authority: Vec<Rr>,
    pub additional: Vec<Rr>,
    pub raw: String,
}

impl Dig {
    /// The sorted data of the answer records of type `rtype`.
    pub fn data(&self, rtype: &str) -> Vec<String> {
        let mut v: Vec<String> = self.answer.iter().filter(|r| r.rtype == rtype).map(|r| r.data.clone()).collect();
        v.sort();
        v
    }

    pub fn has_flag(&self, f: &str) -> bool {
        self.flags.iter().any(|x| x == f)
    }

    /// NOERROR, no answer, the zone's SOA in the authority section.
    pub fn is_nodata(&self) -> bool {
        self.status == "NOERROR" && self.answer.is_empty() && self.authority.iter().any(|r| r.rtype == "SOA")
    }

    pub fn is_nxdomain(&self) -> bool {
        self.status == "NXDOMAIN" && self.answer.is_empty() && self.authority.iter().any(|r| r.rtype == "SOA")
    }
}

/// Runs dig against `server` (one try, 3 s timeout, then `args`) and parses its output.
pub fn dig(server: SocketAddr, args: &[&str]) -> Dig {
    let out = Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string(), "+tries=1", "+time=3", "+noall", "+comments", "+answer", "+authority", "+additional"])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running dig (bind9-dnsutils, installed by `make deps`): {e}"));
    parse_dig(&String::from_utf8_lossy(&out.stdout))
}

fn parse_dig(text: &str) -> Dig {
    let mut d = Dig { raw: text.to_string(), ..Dig::default() };
    let mut section = "";
    for line in text.lines() {
        let l = line.trim();
        if let Some(rest) = l.strip_prefix(";; ->>HEADER<<-") {
            d.status = rest.split("status: ").nth(1).and_then(|s| s.split(',').next()).unwrap_or("").to_string();
        } else if let Some(rest) = l.strip_prefix(";; flags:") {
            d.flags = rest.split(';').next().unwrap_or("").split_whitespace().map(String::from).collect();
        } else if l.starts_with(";; ") && l.ends_with("SECTION:") {
            section = if l.contains("ANSWER") {
                "answer"
            } else if l.contains("AUTHORITY") {
                "authority"
            } else if l.contains("ADDITIONAL") {
                "additional"
            } else {
                ""
            };
        } else if !l.is_empty() && !l.starts_with(';') {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 5 {
                continue;
            }
            let rr = Rr { name: f[0].to_string(), ttl: f[1].parse().unwrap_or(0), rtype: f[3].to_string(), data: f[4..].join(" ") };
            match section {
                "answer" => d.answer.push(rr),
                "authority" => d.authority.push(rr),
                "additional" => d.additional.push(rr),
                _ => {}
            }
        }
    }
    d
}

/// Asks `server` with hickory's client over UDP (with EDNS, as hickory's client sends it) or
/// TCP. UDP answers come as sent: a truncated one has TC set and is not retried.
pub fn hickory_query(server: SocketAddr, name: &str, rtype: RecordType, tcp: bool) -> anyhow::Result<Message> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let provider = TokioRuntimeProvider::new();
        let name = Name::from_str(name)?;
        let resp = if tcp {
            let (stream, handle) = TcpClientStream::new(server, None, Some(Duration::from_secs(5)), provider);
            let (mut client, bg) = Client::<TokioRuntimeProvider>::new(stream.await?, handle);
            tokio::spawn(bg);
            client.query(name, DNSClass::IN, rtype).await?
        } else {
            let stream = UdpClientStream::builder(server, provider).with_timeout(Some(Duration::from_secs(5))).build();
            let (mut client, bg) = Client::<TokioRuntimeProvider>::from_sender(stream);
            tokio::spawn(bg);
            client.query(name, DNSClass::IN, rtype).await?
        };
        Ok(resp.into_message())
    })
}

/// Sends `bytes` in one datagram from 127.0.0.1 and returns the answer, if any arrives
/// within `timeout`.
pub fn send_raw(server: SocketAddr, bytes: &[u8], timeout: Duration) -> Option<Vec<u8>> {
    send_raw_from(std::net::Ipv4Addr::LOCALHOST.into(), server, bytes, timeout)
}

/// Sends `bytes` in one datagram from `from` (any address of 127/8 is local on Linux) and
/// returns the answer, if any arrives within `timeout`.
pub fn send_raw_from(from: std::net::IpAddr, server: SocketAddr, bytes: &[u8], timeout: Duration) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind(SocketAddr::new(from, 0)).unwrap_or_else(|e| panic!("binding a UDP client socket to {from}: {e}"));
    sock.set_read_timeout(Some(timeout)).ok()?;
    sock.send_to(bytes, server).ok()?;
    let mut buf = vec![0u8; 65535];
    let (n, _) = sock.recv_from(&mut buf).ok()?;
    buf.truncate(n);
    Some(buf)
}

/// A DNS query in wire form (recursion desired), with an EDNS OPT record offering `edns`
/// bytes when given.
pub fn query_bytes(id: u16, name: &str, rtype: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(hickory_proto::op::Query::query(Name::from_str(name).expect("a query name"), rtype));
    if let Some(p) = edns {
        let mut e = hickory_proto::op::Edns::new();
        e.set_max_payload(p);
        m.edns = Some(e);
    }
    m.to_vec().expect("encoding a query")
}

/// Waits until `dig ARGS` satisfies `cond`; the last answer. Panics naming `what` after 60 s.
pub fn wait_dig(server: &DnsServer, what: &str, args: &[&str], cond: impl FnMut(&Dig) -> bool) -> Dig {
    crate::wait_for_value(Duration::from_secs(60), || server.dig(args), cond)
        .unwrap_or_else(|t| panic!("timed out after 60 s waiting for {what}; last `dig {}`:\n{}", args.join(" "), t.last.raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dig_output() {
        let text = ";; Got answer:
;; ->>HEADER<<- opcode: QUERY, status: NOERROR, id: 51094
;; flags: qr aa rd; QUERY: 1, ANSWER: 2, AUTHORITY: 0, ADDITIONAL: 2

;; OPT PSEUDOSECTION:
; EDNS: version: 0, flags:; udp: 1232
;; ANSWER SECTION:
web.service.upsync.\t5\tIN\tSRV\t1 3 8080 127-0-0-5.addr.service.upsync.
web.service.upsync.\t5\tIN\tSRV\t2 1 8081 127-0-0-6.addr.service.upsync.

;; ADDITIONAL SECTION:
127-0-0-5.addr.service.upsync. 5 IN\tA\t127.0.0.5
";
        let d = parse_dig(text);
        assert_eq!(d.status, "NOERROR");
        assert!(d.has_flag("aa") && !d.has_flag("tc"));
        assert_eq!(d.data("SRV"), ["1 3 8080 127-0-0-5.addr.service.upsync.", "2 1 8081 127-0-0-6.addr.service.upsync."]);
        assert_eq!(d.additional[0].data, "127.0.0.5");
        assert_eq!(d.answer[0].ttl, 5);
    }
}
