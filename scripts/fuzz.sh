#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/fuzz_targets/*.rs) for FUZZ_SECONDS each (default 60),
# or the targets named as arguments. Installs cargo-fuzz on first use.
#
# Works on the stable toolchain: targets are built without a sanitizer (`-s none`), so
# cargo-fuzz passes rustc no -Z flag (its default, AddressSanitizer, needs nightly or
# RUSTC_BOOTSTRAP=1; the code under test has no unsafe, so it would add cost and little else).
# Debug assertions and overflow checks are on (cargo-fuzz's default).
#
# Corpora grow in fuzz/corpus/TARGET (not committed). Each run also reads, without writing
# to them, fuzz/regressions/TARGET and fuzz/seeds/TARGET (committed; `make test` runs both,
# tests/tests/fuzz_regressions.rs) and, for the decoders, the Consul responses captured in
# discovery/testdata. A crash is copied to fuzz/regressions/TARGET/ and the script exits non-zero
# after running the other targets: fix the crash, commit the case.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here/fuzz"
seconds="${FUZZ_SECONDS:-60}"
say() { printf 'fuzz: %s\n' "$*"; }

if ! cargo fuzz --version >/dev/null 2>&1; then
    say "installing cargo-fuzz (cargo install --locked cargo-fuzz, a few minutes, once)"
    cargo install --locked cargo-fuzz || { echo "fuzz: cargo install cargo-fuzz failed" >&2; exit 1; }
fi

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi
say "building ${#targets[@]} targets"
cargo fuzz build -s none || { echo "fuzz: building the targets failed" >&2; exit 1; }

failed=()
summary=()
for t in "${targets[@]}"; do
    corpus="corpus/$t"
    regressions="regressions/$t"
    artifacts="artifacts/$t"
    mkdir -p "$corpus" "$regressions" "$artifacts"
    dirs=("$corpus" "$regressions")
    [ -d "seeds/$t" ] && dirs+=("seeds/$t")
    case "$t" in decode_*) dirs+=("../discovery/testdata" "../discovery/testdata/fuzz") ;; esac
    log="artifacts/$t/last-run.log"
    say "$t: ${seconds}s"
    cargo fuzz run -s none "$t" "${dirs[@]}" -- \
        -max_total_time="$seconds" -artifact_prefix="$artifacts/" -print_final_stats=1 >"$log" 2>&1
    rc=$?
    runs="$(grep -oE '^stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1)"
    secs="$(grep -oE 'Done [0-9]+ runs in [0-9]+ second' "$log" | grep -oE 'in [0-9]+' | grep -oE '[0-9]+' | tail -1)"
    cov="$(grep -oE 'cov: [0-9]+' "$log" | tail -1)"
    execs="?"
    [ -n "$runs" ] && [ -n "${secs:-$seconds}" ] && execs=$(( runs / ( ${secs:-$seconds} > 0 ? ${secs:-$seconds} : 1 ) ))
    if [ "$rc" -ne 0 ]; then
        failed+=("$t")
        for crash in "$artifacts"/crash-* "$artifacts"/oom-* "$artifacts"/timeout-*; do
            [ -f "$crash" ] || continue
            cp "$crash" "$regressions/"
            say "$t: CRASH kept as fuzz/$regressions/$(basename "$crash") (log fuzz/$log)"
        done
        tail -40 "$log"
    fi
    summary+=("$(printf '%-26s %6s runs %8s execs/s  %s  %s' "$t" "${runs:-?}" "$execs" "${cov:-}" "$([ "$rc" -eq 0 ] && echo ok || echo CRASH)")")
done

say "summary (${seconds}s per target):"
printf '  %s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz: crashes in: ${failed[*]}; their inputs are in fuzz/regressions/ (fix, then commit them)" >&2
    exit 1
fi
