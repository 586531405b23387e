# Sourced by the capture scripts of this directory: starts a Consul dev agent (the one
# `make deps` installs, or CONSUL_BIN) on free loopback ports, stops it on exit, and sets `api`
# to its HTTP address once its node is in the catalog.
consul="${CONSUL_BIN:-/usr/local/bin/consul}"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
http=$(port); work=$(mktemp -d)
"$consul" agent -dev -bind 127.0.0.1 -client 127.0.0.1 -node capture-node -http-port "$http" \
    -dns-port "$(port)" -serf-lan-port "$(port)" -serf-wan-port "$(port)" -server-port "$(port)" \
    -grpc-port "$(port)" >"$work/consul.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
api="http://127.0.0.1:$http"
for _ in $(seq 100); do curl -sf "$api/v1/catalog/node/capture-node" | grep -q capture-node && break; sleep 0.1; done
