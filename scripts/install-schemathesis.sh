#!/usr/bin/env bash
# schemathesis from PyPI, in a virtualenv under build/ (build/schemathesis-venv/bin/st): the
# sidecar's API is tested against sidecar/openapi.yaml with it (tests/tests/sidecar_schema.rs).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
version="4.32.5"
venv="$here/build/schemathesis-venv"
say() { printf 'deps: schemathesis: %s\n' "$*"; }
if [ -x "$venv/bin/st" ] && [ "$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("schemathesis"))' 2>/dev/null)" = "$version" ]; then
    say "$venv already has schemathesis $version"
    exit 0
fi
mkdir -p "$here/build"
[ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check "schemathesis==$version"
say "installed schemathesis $version in $venv"
