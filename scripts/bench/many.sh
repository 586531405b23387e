#!/usr/bin/env bash
# Many-upstreams benchmark (issue 19): 10,000 synced upstreams / 100,000 servers on one nginx:
# time to sync, propagation of one change, connections held to Consul, Consul's CPU under churn
# against one blocking query per upstream (nginx-upsync-module's way), workers' RSS, zone use.
# See benches/src/bin/bench_many.rs (settings: UPSYNC_BENCH_MANY_*). Prints a markdown section;
# JSON in build/bench/many.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --locked -p upsync-benches --bin bench-many >&2
exec target/release/bench-many
