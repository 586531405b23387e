//! Names upsync-dns synthesises: the address names SRV records point at
//! (`10-0-0-1.addr.ZONE`, `2001-db8--1.addr.ZONE`) and the reverse names of PTR queries.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::rr::Name;

/// The label under the zone that holds the synthesised address names.
pub const ADDR_LABEL: &[u8] = b"addr";

/// The label of an address name: the address with `.`/`:` replaced by `-`, as in
/// `ip-10-0-0-1.ec2.internal`. IPv6 keeps its compressed form (`2001-db8--1`), so every label
/// maps back to exactly one address.
pub fn ip_label(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string().replace('.', "-"),
        IpAddr::V6(v6) => v6_label(v6),
    }
}

/// RFC 5952 text with `-` for `:`, always in hex: `Ipv6Addr`'s `Display` writes IPv4-mapped
/// addresses with dots, which cannot be part of a label.
fn v6_label(v6: Ipv6Addr) -> String {
    let seg = v6.segments();
    // The longest run of two or more zero segments (the first one on ties) becomes `--`.
    let (mut best, mut cur) = ((0usize, 0usize), (0usize, 0usize));
    for (i, s) in seg.iter().enumerate() {
        if *s == 0 {
            if cur.1 == 0 {
                cur.0 = i;
            }
            cur.1 += 1;
            if cur.1 > best.1 {
                best = cur;
            }
        } else {
            cur.1 = 0;
        }
    }
    let hex = |s: &[u16]| s.iter().map(|x| format!("{x:x}")).collect::<Vec<_>>().join("-");
    if best.1 < 2 {
        return hex(&seg);
    }
    format!("{}--{}", hex(&seg[..best.0]), hex(&seg[best.0 + best.1..]))
}

/// The address an [`ip_label`] stands for, `None` when the label is not one.
pub fn parse_ip_label(label: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(label).ok()?;
    // A v4 label has exactly three dashes and only digits otherwise; anything else is v6.
    if s.bytes().filter(|&b| b == b'-').count() == 3 && s.bytes().all(|b| b == b'-' || b.is_ascii_digit()) {
        return s.replace('-', ".").parse::<Ipv4Addr>().ok().map(IpAddr::V4);
    }
    let v6 = s.replace('-', ":").parse::<Ipv6Addr>().ok()?;
    // Reject v4-style v6 forms that would give an address two labels.
    (ip_label(IpAddr::V6(v6)).eq_ignore_ascii_case(s)).then_some(IpAddr::V6(v6))
}

/// `LABEL.addr.ZONE` for `ip`.
pub fn addr_name(ip: IpAddr, zone: &Name) -> Name {
    // ip_label only produces [0-9a-f-] labels of at most 39 bytes: always a valid label.
    Name::from_labels([ip_label(ip).as_bytes(), ADDR_LABEL]).and_then(|n| n.append_domain(zone)).unwrap_or_else(|_| zone.clone())
}

/// The address of a full reverse name (`4.3.2.1.in-addr.arpa.`, 32 nibbles of `ip6.arpa.`),
/// `None` for partial or malformed names.
pub fn parse_reverse(name: &Name) -> Option<IpAddr> {
    let net = name.parse_arpa_name().ok()?;
    (net.prefix_len() == net.max_prefix_len()).then(|| net.addr())
}

/// Whether `name` is under `in-addr.arpa.` or `ip6.arpa.`.
pub fn is_reverse(name: &Name) -> bool {
    let mut labels = name.iter().rev();
    let (Some(last), Some(second)) = (labels.next(), labels.next()) else { return false };
    last.eq_ignore_ascii_case(b"arpa") && (second.eq_ignore_ascii_case(b"in-addr") || second.eq_ignore_ascii_case(b"ip6"))
}

/// A zone name from configuration: absolute, lower case, checked.
pub fn parse_zone(text: &str) -> Result<Name, String> {
    let t = text.trim();
    if t.is_empty() || t == "." {
        return Err(format!("zone {text:?}: the root zone cannot be served; name a zone such as service.upsync."));
    }
    let mut name = Name::from_ascii(t).map_err(|e| format!("zone {text:?} is not a valid domain name: {e}"))?;
    name.set_fqdn(true);
    Ok(name.to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_labels_round_trip() {
        for ip in ["10.0.0.1", "127.0.0.5", "::1", "2001:db8::1", "fe80::1:2", "::ffff:10.0.0.1"] {
            let ip: IpAddr = ip.parse().unwrap();
            let label = ip_label(ip);
            assert!(label.len() <= 63 && !label.contains(['.', ':']), "{label}");
            assert_eq!(parse_ip_label(label.as_bytes()), Some(ip), "{label}");
        }
        assert_eq!(ip_label("10.0.0.1".parse().unwrap()), "10-0-0-1");
        assert_eq!(ip_label("2001:db8::1".parse().unwrap()), "2001-db8--1");
    }

    #[test]
    fn bad_ip_labels_are_rejected() {
        for l in ["web", "10-0-0", "10-0-0-256", "1-2-3-4-5", "", "2001-db8-0-0-0-0-0-1", "zz--1"] {
            assert_eq!(parse_ip_label(l.as_bytes()), None, "{l}");
        }
    }

    #[test]
    fn addr_names_are_under_the_zone() {
        let zone = parse_zone("service.upsync").unwrap();
        assert_eq!(addr_name("10.0.0.1".parse().unwrap(), &zone).to_ascii(), "10-0-0-1.addr.service.upsync.");
    }

    #[test]
    fn reverse_names() {
        let n = Name::from_ascii("5.0.0.127.in-addr.arpa.").unwrap();
        assert_eq!(parse_reverse(&n), Some("127.0.0.5".parse().unwrap()));
        assert!(is_reverse(&n));
        let partial = Name::from_ascii("0.127.in-addr.arpa.").unwrap();
        assert_eq!(parse_reverse(&partial), None);
        assert!(is_reverse(&partial));
        let v6 = Name::from_ascii("1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.ip6.arpa.").unwrap();
        assert_eq!(parse_reverse(&v6), Some("::1".parse().unwrap()));
        assert_eq!(parse_reverse(&Name::from_ascii("300.0.0.127.in-addr.arpa.").unwrap()), None);
        assert!(!is_reverse(&Name::from_ascii("web.service.upsync.").unwrap()));
    }

    #[test]
    fn zones_are_normalised() {
        assert_eq!(parse_zone("Service.Upsync").unwrap().to_ascii(), "service.upsync.");
        assert!(parse_zone(".").is_err());
        assert!(parse_zone("").is_err());
        assert!(parse_zone("a..b").is_err());
    }
}
