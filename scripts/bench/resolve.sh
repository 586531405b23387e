#!/usr/bin/env bash
# The module beside nginx 1.28's own `server NAME resolve` (resolver pointed at Consul's DNS, and
# at upsync-dns) and the reload way, on the same work: throughput and failed requests while an
# instance is added and removed every second, propagation (Consul write -> first request on the
# new instance), and what each can express (weight, backup, down, drain).
# See benches/src/bin/bench_resolve.rs. Prints a markdown section; JSON in build/bench/resolve.json.
# Needs `make build` (upsync-dns) and `make build NGINX=1.28` (nginx 1.28 and the module for it).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x build/nginx-1.28/sbin/nginx ] || make --no-print-directory build NGINX=1.28 >&2
cargo build --release --locked -p upsync-benches --bin bench-resolve >&2
exec target/release/bench-resolve
