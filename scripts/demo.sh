#!/usr/bin/env bash
# `make demo`: a Consul dev agent, three backends and nginx with the upsync module, all on
# loopback ports picked now; adds and removes servers in Consul and shows nginx following
# without a reload, prints what to try and runs until Ctrl-C, then stops everything it started
# (by PID). The whole stack with containers, the sidecar and DNS: scripts/demo-stack.sh.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="$here/build"
dir="$(mktemp -d /tmp/upsync-demo.XXXXXX)"
pids=()

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
cleanup() {
    trap - EXIT INT TERM
    echo; echo "demo: stopping ${#pids[@]} processes: ${pids[*]}"
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    sleep 1
    for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    echo "demo: logs kept in $dir"
}
trap cleanup EXIT INT TERM

for f in "$build/ngx_http_upsync_module.so" "$build/upsync-backend" /usr/sbin/nginx; do
    [ -e "$f" ] || { echo "demo: $f is missing; run 'make deps build'" >&2; exit 1; }
done
consul_bin="$(command -v consul || echo /usr/local/bin/consul)"

http_port=$(free_port); dns_port=$(free_port); serf_lan=$(free_port); serf_wan=$(free_port)
server_port=$(free_port); grpc_port=$(free_port); nginx_port=$(free_port)
"$consul_bin" agent -dev -bind 127.0.0.1 -client 127.0.0.1 -node upsync-demo \
    -http-port "$http_port" -dns-port "$dns_port" -serf-lan-port "$serf_lan" -serf-wan-port "$serf_wan" \
    -server-port "$server_port" -grpc-port "$grpc_port" >"$dir/consul.log" 2>&1 &
pids+=($!)
consul="127.0.0.1:$http_port"
for _ in $(seq 1 100); do
    curl -sf "http://$consul/v1/status/leader" | grep -q 127.0.0.1 && break
    sleep 0.1
done
curl -sf "http://$consul/v1/status/leader" | grep -q 127.0.0.1 || { echo "demo: Consul did not start; see $dir/consul.log" >&2; exit 1; }

backends=()
for name in blue green red; do
    port=$(free_port)
    "$build/upsync-backend" --name "$name" --listen "127.0.0.1:$port" >"$dir/backend-$name.log" 2>&1 &
    pids+=($!)
    backends+=("127.0.0.1:$port")
done
# Two of the three backends start registered; the third is for you to add.
curl -sf -X PUT -d '{"weight":1}' "http://$consul/v1/kv/upstreams/app/${backends[0]}" >/dev/null
curl -sf -X PUT -d '{"weight":1}' "http://$consul/v1/kv/upstreams/app/${backends[1]}" >/dev/null

mkdir -p "$dir/tmp"
sed -e "s#@MODULE@#$build/ngx_http_upsync_module.so#" -e "s#@DIR@#$dir#g" -e "s#@CONSUL@#$consul#" \
    -e "s#@BACKEND1@#${backends[0]}#" -e "s#@PORT@#$nginx_port#" "$here/nginx-conf/demo.conf" >"$dir/nginx.conf"
/usr/sbin/nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" &
pids+=($!)
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$nginx_port/" >/dev/null && break; sleep 0.1; done

# The scene: servers added and removed in Consul, nginx follows without a reload (the same
# worker processes before and after).
say() { printf '\ndemo: %s\n' "$*"; }
answers() {
    for _ in $(seq 12); do curl -s "http://127.0.0.1:$nginx_port/"; echo; done | sort | uniq -c | awk '{printf "%s x%s  ", $2, $1}'
}
workers() { pgrep -P "$(cat "$dir/nginx.pid")" | sort -n | tr '\n' ' '; }
wait_show() {
    for _ in $(seq 1 100); do curl -s "http://127.0.0.1:$nginx_port/upstream_show" | grep -q "$1" && return 0; sleep 0.05; done
    echo "demo: nginx did not show '$1'; see $dir/error.log" >&2; return 1
}
wait_gone() {
    for _ in $(seq 1 100); do curl -s "http://127.0.0.1:$nginx_port/upstream_show" | grep -q "$1" || return 0; sleep 0.05; done
    echo "demo: nginx still shows '$1'; see $dir/error.log" >&2; return 1
}
before="$(workers)"
say "nginx workers: $before"
say "12 requests:  $(answers)"
say "adding red (weight 3) in Consul: curl -X PUT -d '{\"weight\":3}' http://$consul/v1/kv/upstreams/app/${backends[2]}"
curl -sf -X PUT -d '{"weight":3}' "http://$consul/v1/kv/upstreams/app/${backends[2]}" >/dev/null
wait_show "${backends[2]}"
say "12 requests:  $(answers)"
say "removing blue: curl -X DELETE http://$consul/v1/kv/upstreams/app/${backends[0]}"
curl -sf -X DELETE "http://$consul/v1/kv/upstreams/app/${backends[0]}" >/dev/null
wait_gone "${backends[0]}"
say "12 requests:  $(answers)"
say "nginx workers: $(workers)($( [ "$(workers)" = "$before" ] && echo 'the same processes: no reload' || echo 'CHANGED'))"
say "what nginx holds now (upstream_show):"
curl -s "http://127.0.0.1:$nginx_port/upstream_show"

cat <<MSG

upsync demo is running (files and logs in $dir)
  nginx      http://127.0.0.1:$nginx_port/          (pid ${pids[-1]}, config $dir/nginx.conf)
  Consul UI  http://$consul/ui/
  backends   blue=${backends[0]} green=${backends[1]} red=${backends[2]}

Try:
  for i in \$(seq 6); do curl -s http://127.0.0.1:$nginx_port/; echo; done      # green and red
  curl -s http://127.0.0.1:$nginx_port/upstream_show                            # the synced list
  curl -s -X PUT -d '{"weight":1}' http://$consul/v1/kv/upstreams/app/${backends[0]}   # blue back, no reload
  curl -s -X PUT -d '{"down":1}' http://$consul/v1/kv/upstreams/app/${backends[1]}     # mark green down

The whole stack (containers, upsync-sidecar, nginx, upsync-dns): make demo-stack

Ctrl-C stops everything.
MSG
wait
