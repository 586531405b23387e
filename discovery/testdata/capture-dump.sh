#!/usr/bin/env bash
# Captures the whole-catalog fixtures (dump_*.json, used by decode/node_dump.rs) from a real
# Consul dev agent: services with tags, weights, meta, failing / warning / maintenance checks,
# an IPv6 and a host-name address, an external node and a node with a critical node check.
# Re-run to refresh them: discovery/testdata/capture-dump.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=dev-agent.sh
source "$here/dev-agent.sh"

reg() { curl -sf -X PUT --data-binary "$1" "$api/v1/agent/service/register" >/dev/null; }
reg '{"ID":"web1","Name":"web","Address":"127.0.0.5","Port":8080,"Tags":["v1","weight=3"],"Meta":{"ver":"1","team":"edge"},"Check":{"CheckID":"web1-ttl","TTL":"600s","Status":"passing"}}'
reg '{"ID":"web2","Name":"web","Address":"127.0.0.6","Port":8081,"Tags":["backup"]}'
reg '{"ID":"web3","Name":"web","Address":"127.0.0.7","Port":8082,"Tags":["v2","down"]}'
reg '{"ID":"web4","Name":"web","Address":"127.0.0.8","Port":8083,"Tags":["v1"],"Check":{"CheckID":"web4-ttl","TTL":"600s","Status":"critical"}}'
reg '{"ID":"web5","Name":"web","Address":"127.0.0.9","Port":8084,"Check":{"CheckID":"web5-ttl","TTL":"600s","Status":"warning"}}'
reg '{"ID":"api1","Name":"api","Port":9000,"Tags":["canary"]}'
reg '{"ID":"api6","Name":"api","Address":"::1","Port":9001}'
reg '{"ID":"pg","Name":"pg","Address":"db.example.com","Port":5432}'
curl -sf -X PUT "$api/v1/catalog/register" -d '{"Node":"ext-node","Address":"10.1.2.3","Service":{"ID":"db1","Service":"db","Port":3306,"Tags":["primary"]}}' >/dev/null
curl -sf -X PUT "$api/v1/catalog/register" -d '{"Node":"sick-node","Address":"10.1.2.4","Service":{"ID":"cache1","Service":"cache","Port":6379},"Check":{"CheckID":"node-health","Name":"node","Status":"critical"}}' >/dev/null
curl -sf -X PUT "$api/v1/agent/service/maintenance/api6?enable=true&reason=upgrade" >/dev/null
sleep 1
curl -sf "$api/v1/internal/ui/nodes" >"$here/dump_ui_nodes.json"
curl -sf "$api/v1/internal/ui/services" >"$here/ui_services.json"
curl -sf "$api/v1/health/state/critical" >"$here/dump_health_critical.json"
curl -sf "$api/v1/health/state/warning" >"$here/dump_health_warning.json"
curl -sf "$api/v1/health/service/web" >"$here/dump_health_web.json"
curl -sf "$api/v1/catalog/nodes" >"$here/dump_catalog_nodes.json"
echo "captured from $("$consul" version | head -1) into $here"
