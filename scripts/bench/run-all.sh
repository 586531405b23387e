#!/usr/bin/env bash
# Every end-to-end benchmark, one after the other (they compete for the same 2 cores).
# Each prints a markdown section; the README's Benchmarks section is made of them. The report
# (build/bench/report.html) is written at the end, also when a benchmark failed, from whatever
# JSON the benchmarks left.
set -uo pipefail
here="$(dirname "$0")"
failed=()
for b in module resolve stream stall many zone callgrind dns sidecar; do
    echo "## $b" >&2
    "$here/$b.sh" || failed+=("$b")
    echo
done
"$here/report.sh" || failed+=(report)
if [ ${#failed[@]} -gt 0 ]; then
    echo "bench: failed: ${failed[*]}" >&2
    exit 1
fi
