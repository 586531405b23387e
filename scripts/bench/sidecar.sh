#!/usr/bin/env bash
# End-to-end benchmark of upsync-sidecar: container engine event -> Consul latency for 100
# containers started one after the other and then killed (the real Docker Engine, then a real
# podman API service; real Consul dev agent), against the engine's own event delivery measured in
# the same run. See benches/src/bin/bench_sidecar.rs. Prints a markdown section per engine.
# SIDECAR_BENCH_CONTAINERS=N changes the number of containers, SIDECAR_BENCH_ENGINES=docker
# (or podman) runs one engine. Needs `make build` (build/upsync-sidecar).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --locked -p upsync-benches --bin bench-sidecar >&2
exec target/release/bench-sidecar
