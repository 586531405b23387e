//! Response rate limiting (RRL), as BIND, NSD and Knot do it: a server answering UDP can be
//! used to reflect and amplify traffic towards a spoofed source address; RRL bounds how many
//! answers one client network gets per second.
//!
//! - Clients are grouped by prefix (`/24` for IPv4, `/56` for IPv6 by default): a spoofed
//!   flood aimed at one victim spreads over its neighbours' addresses too.
//! - Each prefix has a token bucket: `rate` responses per second, up to one second's worth
//!   saved, and a debt of at most `window` seconds' worth (a prefix that flooded must be quiet
//!   for up to `window` before it gets its full rate back).
//! - A response beyond the rate is dropped, except every `slip`-th one, which is sent as an
//!   empty truncated answer (TC=1, header and question only, no larger than the query): a real
//!   client behind that prefix retries over TCP, which cannot be spoofed, and gets its answer.
//! - Clients in the networks allowed recursion (`allow_recursion`, loopback by default) are
//!   exempt: local resolvers and the benchmark are never throttled, and never touch the table.
//! - The table has a fixed size (`table_size` entries, 4-way set associative, least recently
//!   seen entry replaced) and hashes with a per-process random key: a flood from many
//!   prefixes cannot grow memory, nor aim at one set. It is shared by all UDP threads (a lock
//!   per set; only non-exempt clients take one).
//!
//! Written here rather than with a keyed rate limiter crate (governor) because those grow a
//! map with every new key and have no slip.
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ipnet::IpNet;

/// How RRL is set up (`[rrl]` in the configuration file).
#[derive(Clone, Debug, PartialEq)]
pub struct RrlConfig {
    /// Responses per second per client prefix; 0 turns RRL off.
    pub rate: u32,
    /// Every `slip`-th limited response is sent truncated (TC=1); 0: none, 1: all.
    pub slip: u32,
    /// The longest debt a prefix can build up, in seconds of its rate.
    pub window: Duration,
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    /// Prefixes remembered at most (rounded up to a multiple of 4).
    pub table_size: usize,
    /// Networks never limited (the configuration's `allow_recursion`).
    pub exempt: Vec<IpNet>,
}

impl Default for RrlConfig {
    fn default() -> Self {
        RrlConfig {
            rate: 20,
            slip: 2,
            window: Duration::from_secs(15),
            ipv4_prefix: 24,
            ipv6_prefix: 56,
            table_size: 65_536,
            exempt: Vec::new(),
        }
    }
}

/// What to do with one response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Within the rate: answer.
    Send,
    /// Beyond it: answer with an empty truncated response (TC=1).
    Slip,
    /// Beyond it: no answer.
    Drop,
}

const WAYS: usize = 4;
/// A response costs this many units; a prefix earns `rate` units per millisecond.
const UNIT: i64 = 1000;

#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    net: Option<IpNet>,
    /// Units of credit (negative: debt).
    balance: i64,
    /// Milliseconds since `Rrl::epoch` when last seen.
    last_ms: u64,
    /// Limited responses so far (for the slip).
    limited: u32,
}

/// The rate limiter, shared by the UDP threads.
#[derive(Debug)]
pub struct Rrl {
    cfg: RrlConfig,
    sets: Box<[Mutex<[Entry; WAYS]>]>,
    hasher: RandomState,
    epoch: Instant,
}

impl Rrl {
    /// `None` when RRL is off (`rate` 0).
    pub fn new(cfg: &RrlConfig) -> Option<Rrl> {
        if cfg.rate == 0 {
            return None;
        }
        let sets = cfg.table_size.div_ceil(WAYS).max(1);
        Some(Rrl {
            cfg: cfg.clone(),
            sets: (0..sets).map(|_| Mutex::new([Entry::default(); WAYS])).collect(),
            hasher: RandomState::new(),
            epoch: Instant::now(),
        })
    }

    /// Whether `client` is never limited.
    pub fn exempt(&self, client: IpAddr) -> bool {
        crate::forward::allowed(&self.cfg.exempt, client)
    }

    /// The prefix `client` is accounted under.
    pub fn prefix(&self, client: IpAddr) -> IpNet {
        let client = client.to_canonical();
        let len = if client.is_ipv4() { self.cfg.ipv4_prefix } else { self.cfg.ipv6_prefix };
        // The lengths are validated by the configuration (at most 32 / 128).
        IpNet::new(client, len).map(|n| n.trunc()).unwrap_or_else(|_| IpNet::from(client))
    }

    /// Accounts one response to `client` at `now`; what to do with it. Exempt clients are
    /// not looked at here: ask [`Rrl::exempt`] first.
    pub fn check(&self, client: IpAddr, now: Instant) -> Verdict {
        let net = self.prefix(client);
        let now_ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        let rate = i64::from(self.cfg.rate);
        let cap = rate * UNIT;
        let floor = -(rate * self.cfg.window.as_millis().min(86_400_000) as i64);
        let set = (self.hasher.hash_one(net) as usize) % self.sets.len();
        let mut ways = self.sets[set].lock().unwrap_or_else(|e| e.into_inner());
        let i = match ways.iter().position(|e| e.net == Some(net)) {
            Some(i) => i,
            None => {
                // A new prefix takes the unused or least recently seen way, with a full bucket.
                let i = (0..WAYS).min_by_key(|&i| (ways[i].net.is_some(), ways[i].last_ms)).unwrap_or(0);
                ways[i] = Entry { net: Some(net), balance: cap, last_ms: now_ms, limited: 0 };
                i
            }
        };
        let e = &mut ways[i];
        let elapsed = now_ms.saturating_sub(e.last_ms).min(86_400_000) as i64;
        e.balance = (e.balance + elapsed * rate).min(cap);
        e.last_ms = e.last_ms.max(now_ms);
        e.balance = (e.balance - UNIT).max(floor);
        if e.balance >= 0 {
            return Verdict::Send;
        }
        e.limited = e.limited.wrapping_add(1);
        match self.cfg.slip {
            0 => Verdict::Drop,
            n if e.limited.is_multiple_of(n) => Verdict::Slip,
            _ => Verdict::Drop,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rrl(rate: u32, slip: u32) -> Rrl {
        Rrl::new(&RrlConfig { rate, slip, exempt: vec!["127.0.0.1/32".parse().unwrap()], ..RrlConfig::default() }).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn rate_then_slip_every_nth_then_refill() {
        let r = rrl(5, 2);
        let t0 = Instant::now();
        let got: Vec<Verdict> = (0..9).map(|_| r.check(ip("192.0.2.7"), t0)).collect();
        use Verdict::*;
        assert_eq!(got, [Send, Send, Send, Send, Send, Drop, Slip, Drop, Slip]);
        // Another address of the same /24 shares the bucket; another /24 does not.
        assert_eq!(r.check(ip("192.0.2.200"), t0), Drop);
        assert_eq!(r.check(ip("192.0.3.1"), t0), Send);
        // 5 responses a second: after the debt (5 limited) is repaid, one second brings 5 more.
        let later = t0 + Duration::from_secs(2);
        let got: Vec<Verdict> = (0..6).map(|_| r.check(ip("192.0.2.7"), later)).collect();
        assert_eq!(got.iter().filter(|v| **v == Send).count(), 5, "{got:?}");
    }

    #[test]
    fn debt_is_bounded_by_the_window() {
        let r = Rrl::new(&RrlConfig { rate: 10, slip: 0, window: Duration::from_secs(2), ..RrlConfig::default() }).unwrap();
        let t0 = Instant::now();
        for _ in 0..100_000 {
            r.check(ip("198.51.100.1"), t0);
        }
        // 2 s of debt, then 1 s of credit: 3 s after the flood the prefix has its full rate.
        let t = t0 + Duration::from_secs(3);
        assert_eq!((0..10).filter(|_| r.check(ip("198.51.100.1"), t) == Verdict::Send).count(), 10);
    }

    #[test]
    fn prefixes_exemption_and_ipv6() {
        let r = rrl(1, 1);
        assert!(r.exempt(ip("127.0.0.1")) && r.exempt(ip("::ffff:127.0.0.1")) && !r.exempt(ip("127.0.0.2")));
        assert_eq!(r.prefix(ip("10.1.2.3")).to_string(), "10.1.2.0/24");
        assert_eq!(r.prefix(ip("2001:db8:aa:bbcc::1")).to_string(), "2001:db8:aa:bb00::/56");
        let t0 = Instant::now();
        assert_eq!(r.check(ip("2001:db8:aa:bb01::1"), t0), Verdict::Send);
        assert_eq!(r.check(ip("2001:db8:aa:bbff::2"), t0), Verdict::Slip);
    }

    #[test]
    fn the_table_is_bounded_and_recent_prefixes_stay() {
        let r = Rrl::new(&RrlConfig { rate: 1, slip: 0, table_size: 64, ..RrlConfig::default() }).unwrap();
        let t0 = Instant::now();
        assert_eq!(r.sets.len(), 16);
        for i in 0..10_000u32 {
            r.check(IpAddr::from((i << 8).to_be_bytes()), t0);
        }
        assert_eq!(r.sets.len(), 16);
    }
}
