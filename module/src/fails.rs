//! Passive health shared by the workers of an upstream with `zone`: the failure state nginx keeps
//! per peer (`fails`, `accessed`, `checked`, read by `max_fails`/`fail_timeout`), for the servers
//! that failed, in a small table in the shared zone.
//!
//! nginx shares that state for a static upstream with `zone` by keeping the peers themselves in
//! shared memory. Synced lists are built per worker (see `ffi::peers`), so a worker records a
//! change of a peer's state here after nginx's balancer updated its own peer (a failure, or the
//! first success after `fail_timeout`), and the others copy the table onto their peers when they
//! see its epoch move (one atomic load per request otherwise).
//!
//! Only servers with a failure on record have an entry (a server back to `fails = 0` leaves the
//! table), so the table stays small: its size is the number of servers failing at once.
use std::net::SocketAddr;

/// nginx's passive-health state of one peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FailState {
    /// Failures counted since the last success that followed `fail_timeout`.
    pub fails: u64,
    /// When the last failure happened (seconds, nginx's cached time).
    pub accessed: i64,
    /// When the peer was last chosen after its `fail_timeout` ran out, or failed.
    pub checked: i64,
}

/// One server's state in the shared table: the address in a fixed form (IPv4 in the first 4
/// bytes), then the state. Plain data: it lives in shared memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FailEntry {
    ip: [u8; 16],
    port: u16,
    v6: u16,
    _pad: u32,
    pub state: FailState,
}

impl FailEntry {
    pub fn new(addr: SocketAddr, state: FailState) -> FailEntry {
        let (ip, v6) = match addr {
            SocketAddr::V4(a) => {
                let mut ip = [0; 16];
                ip[..4].copy_from_slice(&a.ip().octets());
                (ip, 0)
            }
            SocketAddr::V6(a) => (a.ip().octets(), 1),
        };
        FailEntry { ip, port: addr.port(), v6, _pad: 0, state }
    }

    pub fn addr(&self) -> SocketAddr {
        if self.v6 != 0 {
            SocketAddr::from((self.ip, self.port))
        } else {
            SocketAddr::from(([self.ip[0], self.ip[1], self.ip[2], self.ip[3]], self.port))
        }
    }

    fn same_addr(&self, other: &FailEntry) -> bool {
        self.ip == other.ip && self.port == other.port && self.v6 == other.v6
    }
}

/// What [`record`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Recorded {
    /// The table holds the new state; its length is now this.
    Done(usize),
    /// A new entry is needed and the table has no room: grow it and call again.
    Full,
}

/// Records `state` for `addr` in `table[..len]` (capacity `table.len()`): updates its entry,
/// adds one, or removes it when the server has no failure on record any more (`fails == 0`).
pub fn record(table: &mut [FailEntry], len: usize, addr: SocketAddr, state: FailState) -> Recorded {
    let new = FailEntry::new(addr, state);
    let found = table[..len].iter().position(|e| e.same_addr(&new));
    match (found, state.fails) {
        (Some(i), 0) => {
            table.swap(i, len - 1);
            Recorded::Done(len - 1)
        }
        (Some(i), _) => {
            table[i] = new;
            Recorded::Done(len)
        }
        (None, 0) => Recorded::Done(len),
        (None, _) if len < table.len() => {
            table[len] = new;
            Recorded::Done(len + 1)
        }
        (None, _) => Recorded::Full,
    }
}

/// Drops the entries of servers `keep` says are gone (no longer in the list), compacting
/// `table[..len]`; returns the new length. Run before growing a full table, so entries of
/// servers removed from the list never accumulate.
pub fn retain(table: &mut [FailEntry], len: usize, keep: impl Fn(SocketAddr) -> bool) -> usize {
    let mut n = 0;
    for i in 0..len {
        if keep(table[i].addr()) {
            table[n] = table[i];
            n += 1;
        }
    }
    n
}

/// The capacity a full table of `len` entries grows to.
pub fn grown(len: usize) -> usize {
    (len * 2).max(8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn failed(n: u64, at: i64) -> FailState {
        FailState { fails: n, accessed: at, checked: at }
    }

    #[test]
    fn entries_are_added_updated_and_removed_when_failures_clear() {
        let mut t = [FailEntry::default(); 2];
        assert_eq!(record(&mut t, 0, a("10.0.0.1:80"), failed(1, 100)), Recorded::Done(1));
        assert_eq!(record(&mut t, 1, a("[::1]:80"), failed(1, 101)), Recorded::Done(2));
        assert_eq!(record(&mut t, 2, a("10.0.0.1:80"), failed(2, 102)), Recorded::Done(2));
        assert_eq!(t[0].state, failed(2, 102));
        assert_eq!(t[0].addr(), a("10.0.0.1:80"));
        assert_eq!(t[1].addr(), a("[::1]:80"));
        assert_eq!(record(&mut t, 2, a("10.0.0.2:80"), failed(1, 103)), Recorded::Full);
        // The first success after fail_timeout clears the count: the entry goes.
        assert_eq!(record(&mut t, 2, a("10.0.0.1:80"), FailState { fails: 0, accessed: 102, checked: 110 }), Recorded::Done(1));
        assert_eq!(t[0].addr(), a("[::1]:80"));
        // A success of a server with nothing on record changes nothing.
        assert_eq!(record(&mut t, 1, a("10.0.0.9:80"), FailState::default()), Recorded::Done(1));
        // The same IP on another port, and the IPv4 address whose bytes start an IPv6 one, are
        // other servers.
        assert_eq!(record(&mut t, 1, a("[::1]:81"), failed(1, 1)), Recorded::Done(2));
        assert_eq!(record(&mut t, 2, a("0.0.0.0:80"), failed(1, 1)), Recorded::Full);
    }

    #[test]
    fn retain_drops_servers_no_longer_listed() {
        let mut t = [FailEntry::default(); 4];
        let mut len = 0;
        for (i, s) in ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"].iter().enumerate() {
            let Recorded::Done(n) = record(&mut t, len, a(s), failed(1, i as i64)) else { panic!() };
            len = n;
        }
        let len = retain(&mut t, len, |x| x != a("10.0.0.2:80"));
        assert_eq!(len, 2);
        assert_eq!(t[..len].iter().map(|e| e.addr()).collect::<Vec<_>>(), vec![a("10.0.0.1:80"), a("10.0.0.3:80")]);
        assert_eq!(t[1].state, failed(1, 2));
        assert_eq!(grown(0), 8);
        assert_eq!(grown(8), 16);
    }
}
