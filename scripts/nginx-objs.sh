#!/usr/bin/env bash
# Prepares the nginx build tree the module is compiled against, from Debian's nginx-dev:
# copies /usr/share/nginx/src to build/nginx/src and runs its configure with Debian's exact
# flags into build/nginx/objs (never into the source tree or /usr). Prints the two directories
# as NGINX_SOURCE_DIR=... NGINX_BUILD_DIR=... lines for the Makefile.
#
# To build against another nginx instead, set NGINX_SOURCE_DIR and NGINX_BUILD_DIR yourself
# (a configured source tree with the same ./configure flags as the nginx binary); this script
# is then skipped.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$here/build/nginx"
src_pkg=/usr/share/nginx/src

[ -f "$src_pkg/configure" ] || { echo "nginx-objs: $src_pkg/configure is missing; run 'make deps' (installs nginx-dev)" >&2; exit 1; }
nginx_v="$(dpkg-query -W -f='${Version}' nginx 2>/dev/null || echo none)"
dev_v="$(dpkg-query -W -f='${Version}' nginx-dev 2>/dev/null || echo none)"
if [ "$nginx_v" != "$dev_v" ]; then
    echo "nginx-objs: nginx ($nginx_v) and nginx-dev ($dev_v) versions differ; the module would not load." >&2
    echo "nginx-objs: install the same version of both: apt-get install nginx=$dev_v nginx-dev=$dev_v" >&2
    exit 1
fi

# Debian builds stream as a dynamic module (libnginx-mod-stream); conf_flags (the flags every
# module shares) leaves its flags out, but the stream module (ngx_stream_upsync_module) needs
# the stream headers and NGX_STREAM* defines in its bindings. Same flags as `nginx -V` shows,
# without the GeoIP module (a separate .so needing libGeoIP).
stream_flags=()
if command -v nginx >/dev/null; then
    mapfile -t stream_flags < <(nginx -V 2>&1 | grep -o -- '--with-stream[^ ]*' | grep -v geoip || true)
fi
stamp="$out/objs/.configured-$dev_v-stream${#stream_flags[@]}"
if [ ! -f "$stamp" ]; then
    rm -rf "$out"
    mkdir -p "$out"
    cp -a "$src_pkg" "$out/src"
    (
        cd "$out/src"
        # shellcheck disable=SC1091
        . ./conf_flags
        ./configure \
            --with-cc-opt="$(dpkg-buildflags --get CFLAGS) -fPIC $(dpkg-buildflags --get CPPFLAGS)" \
            --with-ld-opt="$(dpkg-buildflags --get LDFLAGS) -fPIC" \
            "${NGX_CONF_FLAGS[@]}" "${stream_flags[@]}" --builddir="$out/objs" >"$out/configure.log" 2>&1
    ) || { echo "nginx-objs: configure failed; see $out/configure.log" >&2; tail -20 "$out/configure.log" >&2; exit 1; }
    touch "$stamp"
fi
echo "NGINX_SOURCE_DIR=$out/src"
echo "NGINX_BUILD_DIR=$out/objs"
