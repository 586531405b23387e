#!/usr/bin/env bash
# build/bench/report.html (plots embedded as SVG, nothing fetched at view time) and
# build/bench/readme.svg from the JSON files the other benchmarks left in build/bench/; a
# missing file leaves its section with a note. See benches/src/bin/bench_report.rs.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --locked -p upsync-benches --bin bench-report >&2
exec target/release/bench-report "$@"
