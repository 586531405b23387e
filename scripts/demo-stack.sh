#!/usr/bin/env bash
# `make demo-stack`, the whole stack: a Consul dev agent, the container engine (the machine's
# Docker Engine; DEMO_ENGINE=podman: podman's Docker-compatible API service with a store of its
# own), upsync-sidecar, nginx with the upsync module watching the sidecar's KV
# prefix (nginx-conf/sidecar.conf), and upsync-dns answering for the same services. wrk drives
# traffic through nginx while the `web` service is scaled 2 -> 6 -> 2 containers, and dig shows
# the SRV records following; the scene ends with wrk's count of failed requests (0), then
# everything keeps running with the commands to try printed, until Ctrl-C. Everything runs on
# loopback ports picked now; only what the script started is stopped (by PID); the demo's Docker
# containers (label upsync-demo=PID) and image are removed, or the podman store.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="$here/build"
# A short path: podman's unix sockets must stay under 108 bytes.
dir="$(mktemp -d /tmp/upsync-sc.XXXXXX)"
pids=()
engine="${DEMO_ENGINE:-docker}"
case "$engine" in docker|podman) ;; *) echo "demo: DEMO_ENGINE=$engine: use docker or podman" >&2; exit 1;; esac
tag="demo$$"
image="upsync-httpd:$tag"

say() { printf '\ndemo: %s\n' "$*"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }

export CONTAINERS_CONF="$dir/containers.conf" CONTAINERS_STORAGE_CONF="$dir/storage.conf" TMPDIR="$dir/tmp"
mkdir -p "$dir/tmp" "$dir/logs"

cleanup() {
    trap - EXIT INT TERM
    echo; echo "demo: removing the demo's containers and stopping ${#pids[@]} processes: ${pids[*]}"
    if [ "$engine" = docker ]; then
        ids="$(docker ps -aq --filter "label=upsync-demo=$tag" 2>/dev/null || true)"
        [ -z "$ids" ] || docker rm --force $ids >/dev/null 2>&1 || true
        docker image rm --force "$image" >/dev/null 2>&1 || true
    else
        podman rm --all --force --time 0 >/dev/null 2>&1 || true
    fi
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    sleep 1
    for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    logs="$(mktemp -d /tmp/upsync-stack-demo-logs.XXXXXX)"
    cp "$dir"/logs/* "$dir"/error.log "$logs"/ 2>/dev/null || true
    rm -rf "$dir"
    echo "demo: logs kept in $logs"
}
trap cleanup EXIT INT TERM

for f in "$build/ngx_http_upsync_module.so" "$build/upsync-sidecar" "$build/upsync-dns" /usr/sbin/nginx /bin/busybox; do
    [ -e "$f" ] || { echo "demo: $f is missing; run 'make deps build'" >&2; exit 1; }
done
for t in "$engine" wrk curl unshare dig tar; do
    command -v "$t" >/dev/null || { echo "demo: $t is missing; run 'make deps'" >&2; exit 1; }
done
consul_bin="$(command -v consul || echo /usr/local/bin/consul)"

if [ "$engine" = podman ]; then
# podman: its own configuration and store (never the system's), as in tests/src/podman.rs.
cat >"$CONTAINERS_CONF" <<EOF
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
netns = "slirp4netns"
log_driver = "k8s-file"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$dir/events.log"
tmp_dir = "$dir/tmp"
static_dir = "$dir/store/libpod"
volume_path = "$dir/store/volumes"
lock_type = "file"
[network]
network_config_dir = "$dir/networks"
EOF
printf '[storage]\ndriver = "vfs"\nrunroot = "%s/run"\ngraphroot = "%s/store"\n' "$dir" "$dir" >"$CONTAINERS_STORAGE_CONF"
fi

say "building the busybox httpd image (offline, from /bin/busybox)"
mkdir -p "$dir/image/rootfs/bin" "$dir/image/rootfs/tmp"
cp /bin/busybox "$dir/image/rootfs/bin/"
for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -s busybox "$dir/image/rootfs/bin/$a"; done
only=()
if [ "$engine" = docker ]; then
    # No registry: the image is a tar of the directory, imported.
    docker version --format '{{.Server.Version}}' >/dev/null || { echo "demo: the Docker Engine does not answer; start dockerd, or DEMO_ENGINE=podman" >&2; exit 1; }
    tar -C "$dir/image/rootfs" -cf "$dir/image/rootfs.tar" .
    docker import --change 'ENV PATH=/bin' --change 'CMD ["/bin/sh"]' "$dir/image/rootfs.tar" "$image" >/dev/null
    socket=/var/run/docker.sock
    # The machine's engine may run other containers: the sidecar registers only the demo's.
    only=(--container-label "upsync-demo=$tag")
else
    image="localhost/upsync-httpd:demo"
    printf 'FROM scratch\nCOPY rootfs/ /\nENV PATH=/bin\n' >"$dir/image/Containerfile"
    # A tmpfs over /var/lib in a private mount namespace: podman build would otherwise write its
    # blob-info cache to /var/lib/containers/cache.
    unshare --mount --propagation private -- sh -c \
        "mount -t tmpfs upsync-demo /var/lib && exec podman build --quiet --network none -t $image -f $dir/image/Containerfile $dir/image" >/dev/null
    socket="$dir/docker.sock"
    podman system service --time=0 "unix://$socket" >"$dir/logs/podman-service.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 1 100); do curl -sf --unix-socket "$socket" http://podman/_ping >/dev/null 2>&1 && break; sleep 0.1; done
fi

http_port=$(free_port); dns_port=$(free_port); serf_lan=$(free_port); serf_wan=$(free_port)
server_port=$(free_port); grpc_port=$(free_port); nginx_port=$(free_port); api_port=$(free_port)
"$consul_bin" agent -dev -bind 127.0.0.1 -client 127.0.0.1 -node upsync-sidecar-demo \
    -http-port "$http_port" -dns-port "$dns_port" -serf-lan-port "$serf_lan" -serf-wan-port "$serf_wan" \
    -server-port "$server_port" -grpc-port "$grpc_port" >"$dir/logs/consul.log" 2>&1 &
pids+=($!)
consul="127.0.0.1:$http_port"
for _ in $(seq 1 100); do curl -sf "http://$consul/v1/status/leader" | grep -q 127.0.0.1 && break; sleep 0.1; done

"$build/upsync-sidecar" --consul "$consul" --docker-socket "$socket" --listen "127.0.0.1:$api_port" \
    --kv-prefix upstreams --advertise-ip 127.0.0.1 --node-id demo-host --poll 250ms \
    --state-dir "$dir/sidecar-state" --allow-address 127.0.0.0/8 "${only[@]}" >"$dir/logs/sidecar.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$api_port/healthz" >/dev/null && break; sleep 0.1; done

udns_port=$(free_port); udns_metrics=$(free_port)
"$build/upsync-dns" --consul "$consul" --listen "127.0.0.1:$udns_port" --zone service.upsync. \
    --metrics-listen "127.0.0.1:$udns_metrics" >"$dir/logs/upsync-dns.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$udns_metrics/health" >/dev/null && break; sleep 0.1; done
srv() { dig @127.0.0.1 -p "$udns_port" +short web.service.upsync. SRV | sort; }
show_srv() { echo "demo: dig @127.0.0.1 -p $udns_port web.service.upsync. SRV:"; srv | sed 's/^/    /'; }
wait_srv() {
    for _ in $(seq 1 100); do [ "$(srv | grep -c .)" = "$1" ] && { show_srv; return 0; }; sleep 0.1; done
    echo "demo: upsync-dns did not reach $1 SRV records; see $dir/logs" >&2; show_srv; return 1
}

sed -e "s#@MODULE@#$build/ngx_http_upsync_module.so#" -e "s#@DIR@#$dir#g" -e "s#@CONSUL@#$consul#" \
    -e "s#@PORT@#$nginx_port#" "$here/nginx-conf/sidecar.conf" >"$dir/nginx.conf"
/usr/sbin/nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" &
pids+=($!)

servers() { curl -s "http://127.0.0.1:$nginx_port/upstream_show" | grep -c 'server 127.0.0.1' || true; }
wait_servers() {
    for _ in $(seq 1 300); do [ "$(servers)" = "$1" ] && return 0; sleep 0.1; done
    echo "demo: nginx did not reach $1 servers; see $dir/logs" >&2; return 1
}
# Docker's container names are the daemon's: the demo's get its PID as a suffix.
cname() { if [ "$engine" = docker ]; then echo "$1-$tag"; else echo "$1"; fi; }
run_web() {
    local name port
    name=$(cname "$1")
    port=$(free_port)
    "$engine" run -d --name "$name" --network host --stop-timeout 5 --label "SERVICE_${port}_NAME=web" \
        --label "upsync-demo=$tag" "$image" sh -c \
        "mkdir -p /tmp/www && echo $name > /tmp/www/index.html && exec httpd -f -p 127.0.0.1:$port -h /tmp/www" >/dev/null
}

say "starting 2 containers of service web"
run_web web-0; run_web web-1
wait_servers 2
curl -s "http://127.0.0.1:$nginx_port/upstream_show"
wait_srv 2

say "wrk through nginx for 20 s while web scales 2 -> 6 -> 2"
wrk -t2 -c16 -d20s "http://127.0.0.1:$nginx_port/" >"$dir/logs/wrk.txt" 2>&1 &
wrk_pid=$!
pids+=($wrk_pid)
sleep 2
for i in 2 3 4 5; do run_web "web-$i"; done
wait_servers 6 && echo "demo: nginx lists 6 servers"
wait_srv 6
sleep 2
# docker/podman stop: httpd keeps serving during the stop timeout; the sidecar marks it down first.
stops=()
for i in 2 3 4 5; do "$engine" stop "$(cname "web-$i")" >/dev/null 2>&1 & stops+=($!); done
wait "${stops[@]}"
wait_servers 2 && echo "demo: nginx lists 2 servers"
wait_srv 2
wait "$wrk_pid" 2>/dev/null || true
cat "$dir/logs/wrk.txt"
grep -qE 'Non-2xx|Socket errors' "$dir/logs/wrk.txt" && echo "demo: SOME REQUESTS FAILED" || echo "demo: no failed request (no non-2xx, no socket error)"

cat <<MSG

upsync whole-stack demo is running (files in $dir)
  nginx       http://127.0.0.1:$nginx_port/            upstream web synced from Consul KV upstreams/web/
  sidecar API http://127.0.0.1:$api_port/             (sidecar/openapi.yaml)
  upsync-dns  127.0.0.1:$udns_port (UDP+TCP), metrics http://127.0.0.1:$udns_metrics/metrics
  Consul UI   http://$consul/ui/

Try (in another shell):$( [ "$engine" = podman ] && printf '\n  export CONTAINERS_CONF=%s CONTAINERS_STORAGE_CONF=%s' "$CONTAINERS_CONF" "$CONTAINERS_STORAGE_CONF" )
  $engine run -d --name $(cname web-9) --network host --label upsync-demo=$tag --label SERVICE_18099_NAME=web $image httpd -f -p 127.0.0.1:18099 -h /
  $engine stop $(cname web-9)                                   # drained, then deregistered
  curl -s http://127.0.0.1:$nginx_port/upstream_show
  curl -s http://127.0.0.1:$api_port/v1/endpoints | python3 -m json.tool
  curl -s -X PUT http://127.0.0.1:$api_port/v1/endpoints/web/extra -d '{"address":"127.0.0.1","port":18098}'
  curl -s -X DELETE 'http://127.0.0.1:$api_port/v1/endpoints/web/extra?drain=5s'
  curl -s http://127.0.0.1:$api_port/healthz
  dig @127.0.0.1 -p $udns_port web.service.upsync. SRV       # targets with glue A records
  dig @127.0.0.1 -p $udns_port web.service.upsync. A

Ctrl-C stops everything.
MSG
wait
