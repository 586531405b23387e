#!/usr/bin/env bash
# Captures the JSON fixtures of this directory from a real Consul dev agent (the one
# `make deps` installs). Re-run to refresh them: discovery/testdata/capture.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=dev-agent.sh
source "$here/dev-agent.sh"

put() { curl -sf -X PUT --data-binary "$2" "$api/v1/kv/$1" >/dev/null; }
# KV in nginx-upsync-module's layout: numbers, strings, empty values, IPv6, host names, and bad entries.
put upstreams/app/ ''
put upstreams/app/10.0.0.1:8080 '{"weight":3,"max_fails":2,"fail_timeout":10,"down":0,"backup":0}'
put upstreams/app/10.0.0.2:8080 '{"weight":"5","max_fails":"0","fail_timeout":"30s","down":"1"}'
put upstreams/app/10.0.0.3:8080 ''
put upstreams/app/[::1]:8081 '{"backup":1}'
put upstreams/app/backend.local:9000 '{"weight":2}'
put upstreams/app/10.0.0.4 '{"weight":1}'
put upstreams/app/10.0.0.5:0 ''
put upstreams/app/10.0.0.6:8080 'not json'
put upstreams/app/10.0.0.7:8080 '{"weight":0}'
put upstreams/app/sub/10.0.0.8:8080 ''
put upstreams/app2/10.9.9.9:80 ''
curl -sf "$api/v1/kv/upstreams/app/?recurse" >"$here/kv_app.json"

reg() { curl -sf -X PUT --data-binary "$1" "$api/v1/agent/service/register" >/dev/null; }
reg '{"ID":"web-1","Name":"web","Tags":["weight=10","max_fails=3","fail_timeout=20s","v1"],"Address":"10.1.0.1","Port":80,"Meta":{"version":"1.2"},"Check":{"TTL":"60s","Status":"passing"}}'
reg '{"ID":"web-2","Name":"web","Tags":["backup","v1"],"Address":"10.1.0.2","Port":80,"Check":{"TTL":"60s","Status":"warning"}}'
reg '{"ID":"web-3","Name":"web","Tags":["down","v2"],"Port":8080,"Weights":{"Passing":7,"Warning":1},"Check":{"TTL":"60s","Status":"critical"}}'
reg '{"ID":"web-4","Name":"web","Tags":["weight=x"],"Address":"10.1.0.4","Port":80}'
reg '{"ID":"web-5","Name":"web","Address":"[::1]","Port":0}'
reg '{"ID":"web-6","Name":"web","Address":"fd00::6","Port":81,"Check":{"TTL":"60s","Status":"passing"}}'
reg '{"ID":"db-1","Name":"db","Tags":["primary"],"Address":"10.2.0.1","Port":5432}'
curl -sf "$api/v1/catalog/service/web" >"$here/catalog_web.json"
curl -sf "$api/v1/health/service/web" >"$here/health_web.json"
curl -sf "$api/v1/catalog/services" >"$here/services.json"
echo "captured from $("$consul" version | head -1) into $here"
