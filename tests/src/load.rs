//! Load and measurement helpers shared by the integration tests and the end-to-end benchmarks:
//! running `wrk` and reading its report, CPU time of processes from /proc, percentiles.
use std::process::Command;
use std::time::Duration;

/// What one wrk run measured.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct WrkReport {
    pub requests_per_sec: f64,
    pub requests: u64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub non_2xx: u64,
    pub socket_errors: u64,
    /// CPU time (user + system) the measured server's processes used per request, in µs:
    /// unlike requests/s, it does not move when other work competes for the cores.
    pub cpu_us_per_request: f64,
}

impl WrkReport {
    /// The counts (requests, non-2xx answers, socket errors) of several runs added up.
    pub fn sum(rounds: &[WrkReport]) -> WrkReport {
        rounds.iter().fold(WrkReport::default(), |a, r| WrkReport {
            requests: a.requests + r.requests,
            non_2xx: a.non_2xx + r.non_2xx,
            socket_errors: a.socket_errors + r.socket_errors,
            ..a
        })
    }

    /// Requests that failed: non-2xx answers and socket errors (timeouts included).
    pub fn failed(&self) -> u64 {
        self.non_2xx + self.socket_errors
    }
}

/// CPU time (user + system) of `pids`, in µs, from /proc.
pub fn cpu_us(pids: &[u32]) -> f64 {
    let (user, system) = cpu_split_us(pids);
    user + system
}

/// CPU time of `pids` in µs, from /proc, as (user, system): a server whose time is mostly
/// system time spends it in the kernel's socket path, which no user-space change shortens.
pub fn cpu_split_us(pids: &[u32]) -> (f64, f64) {
    // /proc/PID/stat counts in clock ticks of USER_HZ, 100 per second on Linux.
    let us_per_tick = 1e6 / 100.0;
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|s| {
            // Fields after the command name (which may hold spaces): utime and stime are the
            // 12th and 13th.
            let rest = s.rsplit(')').next()?.to_string();
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()?, f.get(12)?.parse::<f64>().ok()?))
        })
        .fold((0.0, 0.0), |(u, s), (pu, ps)| (u + pu * us_per_tick, s + ps * us_per_tick))
}

/// [`wrk`], also measuring the CPU time `pids` (the server's workers) spend per request.
pub fn wrk_cpu(url: &str, threads: u32, conns: u32, duration: Duration, pids: &[u32]) -> anyhow::Result<WrkReport> {
    let before = cpu_us(pids);
    let mut r = wrk(url, threads, conns, duration)?;
    r.cpu_us_per_request = (cpu_us(pids) - before) / r.requests.max(1) as f64;
    Ok(r)
}

/// Runs `wrk -t threads -c conns -d secs --latency url` and parses its report.
pub fn wrk(url: &str, threads: u32, conns: u32, duration: Duration) -> anyhow::Result<WrkReport> {
    wrk_with(url, threads, conns, duration, &[])
}

/// [`wrk`] with more arguments (e.g. `--timeout 10s`: wrk counts a request slower than its
/// default 2 s as a socket error; `-H "Connection: close"`: one TCP connection per request).
pub fn wrk_with(url: &str, threads: u32, conns: u32, duration: Duration, extra: &[&str]) -> anyhow::Result<WrkReport> {
    let out = Command::new("wrk")
        .args(["-t", &threads.to_string(), "-c", &conns.to_string(), "-d", &format!("{}s", duration.as_secs()), "--latency"])
        .args(extra)
        .arg(url)
        .output()
        .map_err(|e| anyhow::anyhow!("running wrk (install it with `make deps`): {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    parse_wrk(&text).ok_or_else(|| anyhow::anyhow!("cannot read wrk's report:\n{text}\n{}", String::from_utf8_lossy(&out.stderr)))
}

fn ms(v: &str) -> Option<f64> {
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => return None,
    })
}

/// Reads wrk 4's text report.
pub fn parse_wrk(text: &str) -> Option<WrkReport> {
    let mut r = WrkReport::default();
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => r.requests_per_sec = v.parse().ok()?,
            ["50%", v] => r.latency_p50_ms = ms(v)?,
            ["99%", v] => r.latency_p99_ms = ms(v)?,
            [n, "requests", "in", ..] => r.requests = n.parse().ok()?,
            ["Non-2xx", "or", "3xx", "responses:", n] => r.non_2xx = n.parse().ok()?,
            ["Socket", "errors:", rest @ ..] => {
                r.socket_errors = rest.iter().filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok()).sum();
            }
            _ => {}
        }
    }
    (r.requests > 0).then_some(r)
}

/// The p-th percentile (0..=100) of `v` (sorted in place).
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let idx = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[idx.min(v.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_reports() {
        let text = "Running 10s test @ http://127.0.0.1:1/
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.10ms  512.00us  20.00ms   90.00%
  Latency Distribution
     50%    1.01ms
     75%    1.20ms
     90%    1.50ms
     99%    3.25ms
  612345 requests in 10.00s, 90.00MB read
  Socket errors: connect 0, read 3, write 0, timeout 2
  Non-2xx or 3xx responses: 7
Requests/sec:  61234.50
Transfer/sec:      9.00MB
";
        let r = parse_wrk(text).unwrap();
        assert_eq!(r.requests, 612345);
        assert_eq!(r.non_2xx, 7);
        assert_eq!(r.socket_errors, 5);
        assert!((r.latency_p99_ms - 3.25).abs() < 1e-9 && (r.latency_p50_ms - 1.01).abs() < 1e-9);
        assert!((r.requests_per_sec - 61234.5).abs() < 1e-9);
        assert_eq!(ms("850.00us"), Some(0.85));
        assert!(parse_wrk("garbage").is_none());
        let mut v = vec![5.0, 1.0, 3.0];
        assert_eq!(percentile(&mut v, 50.0), 3.0);
    }
}
