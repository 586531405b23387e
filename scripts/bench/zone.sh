#!/usr/bin/env bash
# Memory per synced server: the module's shared zone and each worker's private memory for one
# upstream of 10 / 1,000 / 10,000 servers, next to stock nginx with the same servers in an
# upstream with nginx's own `zone`. See benches/src/bin/bench_zone.rs. Prints a markdown
# section, writes build/bench/zone.json. UPSYNC_BENCH_ZONE_SIZES (default 10,1000,10000).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --locked -p upsync-benches --bin bench-zone >&2
target/release/bench-zone
