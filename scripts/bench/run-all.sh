#!/usr/bin/env bash
# Every end-to-end benchmark, one after the other (they compete for the same 2 cores).
# Each prints a markdown section; the README's Benchmarks section is made of them.
set -euo pipefail
here="$(dirname "$0")"
for b in module stream stall many callgrind dns sidecar; do
    echo "## $b" >&2
    "$here/$b.sh"
    echo
done
