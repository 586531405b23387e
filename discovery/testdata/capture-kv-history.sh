#!/usr/bin/env bash
# Captures three answers of one KV prefix from a real Consul dev agent, for the tests of the
# watch's per-key decode cache (`decode::KvCache`): a first state, the state after a value
# changed, a key was deleted and one was added, and the state after a snapshot of the first
# was restored (every ModifyIndex back to the first's, the X-Consul-Index back too). Re-run to
# refresh them: discovery/testdata/capture-kv-history.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=dev-agent.sh
source "$here/dev-agent.sh"

put() { curl -sf -X PUT --data-binary "$2" "$api/v1/kv/$1" >/dev/null; }
get() { curl -sf -D "$work/headers" "$api/v1/kv/upstreams/hist?recurse" >"$here/$1"; grep -i '^x-consul-index' "$work/headers" | tr -d '\r'; }
put upstreams/hist/10.0.0.1:8080 '{"weight":3}'
put upstreams/hist/10.0.0.2:8080 ''
put upstreams/hist/10.0.0.3:8080 '{"down":1}'
put upstreams/hist/backend.local:9000 '{"weight":2}'
put upstreams/hist/10.0.0.9 'no port'
echo "kv_hist_1.json: $(get kv_hist_1.json)"
"$consul" snapshot save -http-addr="$api" "$work/first.snap" >/dev/null
put upstreams/hist/10.0.0.1:8080 '{"weight":5}'
curl -sf -X DELETE "$api/v1/kv/upstreams/hist/10.0.0.2:8080" >/dev/null
put upstreams/hist/10.0.0.4:8080 '{"backup":1}'
put upstreams/hist/10.0.0.9 ''
echo "kv_hist_2.json: $(get kv_hist_2.json)"
"$consul" snapshot restore -http-addr="$api" "$work/first.snap" >/dev/null
echo "kv_hist_3.json: $(get kv_hist_3.json)"
echo "captured from $("$consul" version | head -1) into $here"
