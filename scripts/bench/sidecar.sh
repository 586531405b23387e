#!/usr/bin/env bash
# End-to-end benchmark of upsync-sidecar: container engine event -> Consul latency for 100
# containers started one after the other and then killed (real podman API service, real Consul
# dev agent), against the engine's own event delivery measured in the same run.
# See tests/tests/sidecar_bench.rs. Prints a markdown section. SIDECAR_BENCH_CONTAINERS=N
# changes the number of containers.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --locked -p upsync-sidecar >&2
export UPSYNC_SIDECAR_BIN="$PWD/target/release/upsync-sidecar"
cargo test --release --locked -p upsync-tests --test sidecar_bench -- --ignored --nocapture --test-threads=1 2>&1 \
    | sed -n '/^upsync-sidecar:/,/^p99 ratio/p'
