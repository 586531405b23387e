#!/usr/bin/env bash
# Installs everything upsync needs on a fresh Debian 12 (bookworm), as root. Idempotent:
# a second run finds everything in place and changes nothing.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
say() { printf 'deps: %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "deps: must run as root (it installs Debian packages); try: sudo make deps" >&2
    exit 1
fi

# Debian packages. dpkg-dev, binutils, help2man: `make package` (dpkg-shlibdeps, strip, man
# pages); systemd: `systemd-analyze verify` of the packaged units (it need not be PID 1).
# gcc, make and the -dev libraries: nginx 1.28 built from the nginx-src crate's source
# (`make build NGINX=1.28`, `make test`), with the system's OpenSSL, PCRE2 and zlib.
# nginx and nginx-dev must be the same version (the module is built against
# nginx-dev's headers and loaded into nginx); apt installs the candidate of both together.
# libnginx-mod-stream: Debian's nginx has stream as a dynamic module, which the stream module
# (ngx_stream_upsync_module.so) needs loaded first.
packages=(
    nginx nginx-dev libnginx-mod-stream libclang-dev pkg-config curl ca-certificates
    wrk dnsperf bind9-dnsutils valgrind
    dnsmasq-base unbound nsd knot
    podman runc busybox-static uidmap slirp4netns fuse-overlayfs
    python3-pip python3-venv
    iproute2 procps psmisc
    dpkg-dev binutils help2man systemd adduser
    # headless browser for the module's status page test (tests/tests/module_status_page.rs),
    # Prometheus for the metrics and dashboard test (tests/tests/metrics_dashboard.rs)
    chromium prometheus
    gcc make libc6-dev libssl-dev libpcre2-dev zlib1g-dev
)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    say "Debian packages already installed (${#packages[@]})"
fi

# The Docker Engine (the sidecar's tests, bench and demo): Debian's docker.io, unless an engine
# is installed already (Docker CE's packages conflict with docker.io).
if ! command -v dockerd >/dev/null 2>&1; then
    say "installing the Docker Engine (docker.io)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io >/dev/null
fi
docker version --format '{{.Server.Version}}' >/dev/null 2>&1 || say "warning: the Docker Engine does not answer on /var/run/docker.sock; start it (systemctl start docker) before make test"

# The unbound package enables a system service listening on port 53; we only want its binary.
# nsd and knot (the authoritative peers of `scripts/bench/dns.sh`) do the same.
for unit in unbound nsd knot; do
    if systemctl is-enabled "$unit" >/dev/null 2>&1; then systemctl disable --now "$unit" >/dev/null 2>&1 || true; fi
done
# Likewise Prometheus: the tests run their own, on a free loopback port.
if systemctl is-enabled prometheus >/dev/null 2>&1; then systemctl disable --now prometheus >/dev/null 2>&1 || true; fi

nginx_v="$(dpkg-query -W -f='${Version}' nginx)"
dev_v="$(dpkg-query -W -f='${Version}' nginx-dev)"
if [ "$nginx_v" != "$dev_v" ]; then
    echo "deps: nginx $nginx_v and nginx-dev $dev_v differ; install the same version of both (apt-get install nginx=$dev_v)" >&2
    exit 1
fi
say "nginx and nginx-dev $nginx_v"

"$here/scripts/install-consul.sh"
"$here/scripts/install-etcd.sh"
"$here/scripts/install-schemathesis.sh"
# cargo-fuzz is not installed here: it takes minutes to compile and only `make fuzz` needs
# it (scripts/fuzz.sh installs it on first use).
say "done"
