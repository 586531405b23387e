#!/usr/bin/env bash
# Instructions per request (callgrind): stock nginx vs nginx + module, round robin / least_conn /
# ip_hash on the leader worker and on a follower, under churn, and the cost of one list change.
# See benches/src/bin/bench_callgrind.rs. Prints a markdown section, writes
# build/bench/callgrind.json. UPSYNC_BENCH_CG_REQUESTS (default 20000) sets the requests per run,
# UPSYNC_BENCH_CG_RUNS (default 3) the process starts per configuration (minimum and spread),
# UPSYNC_BENCH_CG_ONLY the parts (rr,least_conn,ip_hash,follower,churn,churn-default,change;
# follower-rr, follower-least_conn, follower-ip_hash for one follower row).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --locked -p upsync-benches --bin bench-callgrind >&2
target/release/bench-callgrind
