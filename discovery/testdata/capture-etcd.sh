#!/usr/bin/env bash
# Captures the etcd fixtures of this directory (etcd_*.json, etcd_*.jsonl) from a real etcd 3.5
# (the one `make deps` installs, or ETCD_BIN) with the v2 API enabled: the same servers through
# v2 and v3, the errors the watch handles, and the messages of a v3 watch stream.
# Re-run to refresh them: discovery/testdata/capture-etcd.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
etcd="${ETCD_BIN:-/usr/local/bin/etcd}"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
client=$(port); peer=$(port); work=$(mktemp -d)
"$etcd" --name capture --data-dir "$work/data" --enable-v2 \
    --listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client" \
    --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
    --initial-cluster "capture=http://127.0.0.1:$peer" >"$work/etcd.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
api="http://127.0.0.1:$client"
for _ in $(seq 100); do curl -sf "$api/health" | grep -q '"health":"true"' && break; sleep 0.1; done

b64() { printf %s "$1" | base64 -w0; }
v2put() { curl -sf -X PUT "$api/v2/keys/$1" --data-urlencode "value=$2" >/dev/null; }
v3put() { curl -sf -X POST "$api/v3/kv/put" -d "{\"key\":\"$(b64 "$1")\",\"value\":\"$(b64 "$2")\"}" >/dev/null; }
# The entries of kv_app.json (capture.sh), in both stores.
entries=(
    '10.0.0.1:8080' '{"weight":3,"max_fails":2,"fail_timeout":10,"down":0,"backup":0}'
    '10.0.0.2:8080' '{"weight":"5","max_fails":"0","fail_timeout":"30s","down":"1"}'
    '10.0.0.3:8080' ''
    '[::1]:8081' '{"backup":1}'
    'backend.local:9000' '{"weight":2}'
    '10.0.0.4' '{"weight":1}'
    '10.0.0.5:0' ''
    '10.0.0.6:8080' 'not json'
    '10.0.0.7:8080' '{"weight":0}'
    'sub/10.0.0.8:8080' ''
)
for ((i = 0; i < ${#entries[@]}; i += 2)); do
    v2put "upstreams/app/${entries[i]}" "${entries[i + 1]}"
    v3put "upstreams/app/${entries[i]}" "${entries[i + 1]}"
done
v2put upstreams/app2/10.9.9.9:80 ''
v3put upstreams/app2/10.9.9.9:80 ''

# v2: a listing, a folder that does not exist, a change seen by a long poll.
curl -s "$api/v2/keys/upstreams/app?recursive=true&quorum=true" >"$here/etcd_v2_keys.json"
curl -s "$api/v2/keys/upstreams/none?recursive=true" >"$here/etcd_v2_not_found.json"
index=$(curl -sI "$api/v2/keys/upstreams/app" | tr -d '\r' | awk -F': ' 'tolower($1)=="x-etcd-index" {print $2}')
curl -s "$api/v2/keys/upstreams/app?wait=true&recursive=true&waitIndex=$((index + 1))" >"$work/poll" &
poll=$!
sleep 0.5
v2put upstreams/app/10.0.0.9:8080 '{"weight":9}'
wait "$poll"
cp "$work/poll" "$here/etcd_v2_watch.json"
# More than the 1000 events v2 keeps, then a poll from the start: error 401.
for i in $(seq 1100); do v2put elsewhere/key "$i"; done
curl -s "$api/v2/keys/upstreams/app?wait=true&recursive=true&waitIndex=1" >"$here/etcd_v2_cleared.json"

# v3: a range, an empty range, a request the gateway refuses.
range() { printf '{"key":"%s","range_end":"%s"}' "$(b64 "$1/")" "$(b64 "${1}0")"; }
curl -s -X POST "$api/v3/kv/range" -d "$(range upstreams/app)" >"$here/etcd_v3_range.json"
curl -s -X POST "$api/v3/kv/range" -d "$(range upstreams/none)" >"$here/etcd_v3_range_empty.json"
curl -s -X POST "$api/v3/kv/range" -d 'not json' >"$here/etcd_v3_error.json"
# A watch stream from the revision after the range: created, a put, a delete, a put of an
# empty value.
rev=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["header"]["revision"])' "$here/etcd_v3_range.json")
watch() { printf '{"create_request":{"key":"%s","range_end":"%s","start_revision":"%s","progress_notify":true}}' "$(b64 upstreams/app/)" "$(b64 upstreams/app0)" "$1"; }
curl -sN -X POST "$api/v3/watch" -H 'Grpc-Metadata-Hasleader: true' -d "$(watch $((rev + 1)))" >"$work/watch" &
stream=$!
sleep 0.5
v3put upstreams/app/10.0.0.9:8080 '{"weight":9}'
curl -sf -X POST "$api/v3/kv/deleterange" -d "{\"key\":\"$(b64 upstreams/app/10.0.0.1:8080)\"}" >/dev/null
v3put upstreams/app/10.0.0.10:8080 ''
sleep 0.5
kill "$stream"; wait "$stream" 2>/dev/null || true
cp "$work/watch" "$here/etcd_v3_watch.jsonl"
# Compacted past the revision a watch starts from: created, then canceled.
now=$(curl -s -X POST "$api/v3/kv/range" -d "{\"key\":\"$(b64 x)\"}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["header"]["revision"])')
curl -sf -X POST "$api/v3/kv/compaction" -d "{\"revision\":\"$now\"}" >/dev/null
curl -sN -X POST "$api/v3/watch" -d "$(watch $((rev + 1)))" >"$work/compacted" &
stream=$!
sleep 0.5
kill "$stream"; wait "$stream" 2>/dev/null || true
cp "$work/compacted" "$here/etcd_v3_compacted.jsonl"
echo "captured from $("$etcd" --version | head -1) into $here"
