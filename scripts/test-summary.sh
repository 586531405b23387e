#!/usr/bin/env bash
# Passes cargo test's output through and ends with one summary line per test binary plus the
# totals, so the end of `make test` tells at a glance what ran and what failed. Exits non-zero
# if any test failed or cargo itself failed.
set -uo pipefail
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
tee "$log"
status=${PIPESTATUS[0]}
echo
echo "==== summary ===="
awk '
  /^ *Running unittests / { n=split($0, a, "/"); d=a[n]; sub(/-[0-9a-f]+\)?$/, "", d); bin=d " (unit tests, " $3 ")" ; next }
  /^ *Running / { bin=$2; next }
  /^ *Doc-tests / { bin=$2 " (doc tests)"; next }
  /^test result:/ { printf "%-60s %s\n", bin, $0;
                    for (i=1;i<=NF;i++) { if ($(i+1) ~ /^passed;?$/) p+=$i; if ($(i+1) ~ /^failed;?$/) f+=$i; if ($(i+1) ~ /^ignored;?$/) ig+=$i } }
  END { printf "total: %d passed, %d failed, %d ignored\n", p, f, ig; if (f>0) exit 1 }
' "$log" || status=1
if grep -qE '^error(\[|:)|could not compile' "$log"; then
    echo "cargo reported errors (a target did not compile or a test binary failed to run):"
    grep -E '^error(\[|:)|could not compile' "$log" | head -5
    status=1
fi
exit "$status"
