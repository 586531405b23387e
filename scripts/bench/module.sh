#!/usr/bin/env bash
# End-to-end benchmark of the nginx module: module vs stock nginx, churn vs reload, propagation.
# See benches/src/bin/bench_module.rs. Prints a markdown table; JSON in build/bench/module.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --locked -p upsync-benches --bin bench-module >&2
exec target/release/bench-module
