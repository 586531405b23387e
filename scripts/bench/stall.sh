#!/usr/bin/env bash
# Big-upstream stall benchmark: the longest request stall around one Consul change in upstreams
# of 1,000 / 20,000 / 50,000 servers, next to the same load without changes.
# See benches/src/bin/bench_stall.rs. Prints a markdown section; JSON in build/bench/stall-*.json.
# UPSYNC_BENCH_STALL_BASELINE=PATH.so also runs it against another build of the module (e.g.
# one built from an older commit) for comparison.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --locked -p upsync-benches --bin bench-stall >&2
target/release/bench-stall
if [ -n "${UPSYNC_BENCH_STALL_BASELINE:-}" ]; then
    echo
    UPSYNC_MODULE="$UPSYNC_BENCH_STALL_BASELINE" UPSYNC_BENCH_STALL_LABEL="${UPSYNC_BENCH_STALL_BASELINE_LABEL:-baseline}" \
        target/release/bench-stall
fi
