//! The consistent-hash ring of nginx's `hash KEY consistent`, rebuilt for every synced list.
//!
//! nginx builds the ring once, from the `server` lines, when the configuration loads, and keeps
//! it in the `hash` module's per-upstream configuration (`points`); its request path looks a key
//! up in that ring and then finds the peer whose `server` string the point names. A synced
//! upstream gets a new ring with every new list (built with the peers, off the event loop for
//! large lists), laid out exactly as nginx lays it out (`ngx_http_upstream_init_chash`,
//! compatible with Cache::Memcached::Fast): for each primary server, `weight * 160` points whose
//! hashes chain `crc32(HOST "\0" PORT PREV_HASH)` from a previous hash of 0, sorted, duplicates
//! dropped. So for the same servers a synced upstream maps every key to the same server as a
//! stock nginx with those servers written in its configuration.
//!
//! Written here rather than taken from a crate: the point layout is nginx's own (no ketama crate
//! reproduces it byte for byte), and it is a dozen lines over `crc32fast`.

/// Points per unit of weight (nginx's constant).
pub const POINTS_PER_WEIGHT: usize = 160;

/// One point: its hash and the index of the server (in the order given to [`ring`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Point {
    pub hash: u32,
    pub server: usize,
}

/// Splits `HOST:PORT` as nginx does for the ring: `unix:PATH` is all host; otherwise the digits
/// after the last `:` are the port when everything after it is digits.
fn host_port(server: &[u8]) -> (&[u8], &[u8]) {
    if server.len() >= 5 && server[..5].eq_ignore_ascii_case(b"unix:") {
        return (&server[5..], b"");
    }
    for j in 0..server.len() {
        let c = server[server.len() - j - 1];
        if c == b':' {
            return (&server[..server.len() - j - 1], &server[server.len() - j..]);
        }
        if !c.is_ascii_digit() {
            break;
        }
    }
    (server, b"")
}

/// The ring for `servers` (`(server string as in nginx's peer, weight)`), sorted by hash, with
/// later points of an already present hash dropped.
pub fn ring<'a>(servers: impl Iterator<Item = (&'a [u8], usize)>) -> Vec<Point> {
    let mut points = Vec::new();
    for (index, (server, weight)) in servers.enumerate() {
        let (host, port) = host_port(server);
        let mut base = crc32fast::Hasher::new();
        base.update(host);
        base.update(b"\0");
        base.update(port);
        let mut prev: u32 = 0;
        for _ in 0..weight.max(1) * POINTS_PER_WEIGHT {
            let mut h = base.clone();
            // nginx feeds the previous hash's bytes in memory order (little-endian here).
            h.update(&prev.to_le_bytes());
            let hash = h.finalize();
            points.push(Point { hash, server: index });
            prev = hash;
        }
    }
    // Stable: among equal hashes the first server's point stays, as the dedup below keeps the
    // first (nginx's qsort is not stable; equal 32-bit hashes among a ring's points are rare).
    points.sort_by_key(|p| p.hash);
    points.dedup_by_key(|p| p.hash);
    points
}

/// The point a key's hash lands on (nginx's `ngx_http_upstream_find_chash_point`): the first
/// point whose hash is at least `hash`, wrapping to the first. Used by tests to predict nginx.
pub fn find(points: &[Point], hash: u32) -> usize {
    let i = points.partition_point(|p| p.hash < hash);
    if points.is_empty() {
        0
    } else {
        i % points.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port_split_as_nginx_does() {
        assert_eq!(host_port(b"10.0.0.1:8080"), (&b"10.0.0.1"[..], &b"8080"[..]));
        assert_eq!(host_port(b"[::1]:80"), (&b"[::1]"[..], &b"80"[..]));
        assert_eq!(host_port(b"unix:/tmp/s"), (&b"/tmp/s"[..], &b""[..]));
        assert_eq!(host_port(b"backend"), (&b"backend"[..], &b""[..]));
        assert_eq!(host_port(b"a:b"), (&b"a:b"[..], &b""[..]));
    }

    #[test]
    fn the_ring_has_160_points_per_weight_sorted() {
        let servers: Vec<(&[u8], usize)> = vec![(b"10.0.0.1:80", 1), (b"10.0.0.2:80", 2)];
        let r = ring(servers.into_iter());
        assert!(r.len() > 470 && r.len() <= 480, "{}", r.len());
        assert!(r.windows(2).all(|w| w[0].hash < w[1].hash));
        let second = r.iter().filter(|p| p.server == 1).count();
        assert!((315..=320).contains(&second), "{second}");
    }

    #[test]
    fn the_first_point_chains_from_a_zero_hash() {
        // crc32("10.0.0.1" "\0" "80" 00 00 00 00), computed independently of the chain.
        let mut h = crc32fast::Hasher::new();
        h.update(b"10.0.0.1\x0080\x00\x00\x00\x00");
        let first = h.finalize();
        let r = ring(std::iter::once((&b"10.0.0.1:80"[..], 1)));
        assert!(r.iter().any(|p| p.hash == first));
    }

    #[test]
    fn adding_one_server_to_ten_moves_about_a_eleventh_of_keys() {
        let names: Vec<String> = (1..=11).map(|i| format!("10.0.0.{i}:80")).collect();
        let ten = ring(names[..10].iter().map(|n| (n.as_bytes(), 1)));
        let eleven = ring(names.iter().map(|n| (n.as_bytes(), 1)));
        let moved = (0..10_000u32)
            .filter(|k| {
                let h = crc32fast::hash(format!("key{k}").as_bytes());
                ten[find(&ten, h)].server != eleven[find(&eleven, h)].server
            })
            .count();
        let fraction = moved as f64 / 10_000.0;
        assert!(fraction < 1.0 / 11.0 + 0.03, "{fraction}");
        assert!(fraction > 0.03, "{fraction}");
    }
}
