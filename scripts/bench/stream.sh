#!/usr/bin/env bash
# End-to-end benchmark of the stream module: new TCP connections/s through nginx's stream proxy,
# upstream synced by ngx_stream_upsync_module vs stock nginx with static servers.
# See benches/src/bin/bench_stream.rs. Prints a markdown table; JSON in build/bench/stream.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --locked -p upsync-benches --bin bench-stream >&2
exec target/release/bench-stream
