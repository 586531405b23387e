#!/usr/bin/env bash
# End-to-end benchmark of upsync-dns against Consul's DNS, dnsmasq, unbound, NSD and Knot serving the same
# records, plus freshness (Consul write -> DNS answer). See benches/src/bin/bench_dns.rs.
# Prints a markdown section; JSON in build/bench/dns.json. Needs `make build` (build/upsync-dns).
set -euo pipefail
cd "$(dirname "$0")/../.."
for tool in dnsperf dnsmasq unbound nsd knotd dig; do
    command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] || { echo "bench dns: $tool is missing; run 'make deps'" >&2; exit 1; }
done
cargo build --release --locked -p upsync-benches --bin bench-dns >&2
exec target/release/bench-dns
