#!/usr/bin/env bash
# `make package`: Debian packages of what `make build` left in build/, for Debian 12's nginx:
#
#   libnginx-mod-http-upsync  the module, installed and enabled like Debian's libnginx-mod-*
#                             (/usr/lib/nginx/modules/, modules-available/mod-http-upsync.conf
#                             linked from /etc/nginx/modules-enabled/, Depends: nginx-abi-*)
#   libnginx-mod-stream-upsync  the stream module, likewise (70-mod-stream-upsync.conf, after
#                             Debian's 50-mod-stream.conf; Depends: libnginx-mod-stream)
#   upsync-dns                /usr/sbin/upsync-dns, /etc/upsync/dns.toml, a hardened systemd
#   upsync-sidecar            unit, a man page; likewise for upsync-sidecar
#
# Binaries lose their debug information (55 MB -> 10 MB) but keep their symbol table, so a
# backtrace (RUST_BACKTRACE=1) still names the functions.
#
# Each package is staged as a file tree (build/packages/stage/debian/PACKAGE, debhelper's
# layout, so dpkg-shlibdeps computes the library dependencies; removed once built) and built with
# `dpkg-deb --build --root-owner-group`: no debian/ source package, no cargo-deb to compile.
# Packaging files (configurations, units, maintainer scripts, man page sections):
# packaging/.
#
# Usage: scripts/package.sh [OUT_DIR]   (default build/packages)
# Environment: UPSYNC_BUILD_DIR (binaries, default build/), DEB_REVISION (default 1),
# DEB_MAINTAINER, SOURCE_DATE_EPOCH (default: the last commit's time).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${UPSYNC_BUILD_DIR:-$here/build}"
out="$(realpath -m "${1:-$here/build/packages}")"
pk="$here/packaging"
say() { printf 'package: %s\n' "$*"; }
die() { printf 'package: %s\n' "$*" >&2; exit 1; }

for tool in dpkg-deb dpkg-shlibdeps help2man strip gzip; do
    command -v "$tool" >/dev/null || die "$tool is missing: run 'make deps' (it installs dpkg-dev, help2man, binutils)"
done
for f in ngx_http_upsync_module.so ngx_stream_upsync_module.so upsync-dns upsync-sidecar; do
    [ -x "$bin/$f" ] || die "$bin/$f is missing: run 'make build' first"
done

# The nginx ABI the module was compiled for: Debian's nginx-dev (the tree `make build` uses)
# names it in its substvars, and Debian's nginx Provides it. A module built against another
# nginx (make build NGINX_SOURCE_DIR=...) is refused here rather than packaged for Debian's.
abi_file=/usr/share/nginx/src/debian/libnginx-mod.abisubstvars
[ -f "$abi_file" ] || die "$abi_file is missing: run 'make deps' (installs nginx-dev)"
abi="$(sed -n 's/^nginx:abi=//p' "$abi_file")"
[ -n "$abi" ] || die "no nginx:abi line in $abi_file"
provides="$(dpkg-query -W -f='${Provides}' nginx 2>/dev/null || true)"
case ", $provides," in
    *", $abi,"*) ;;
    *) die "the installed nginx does not provide $abi (it provides: ${provides:-nothing}); install nginx and nginx-dev of the same version ('make deps')" ;;
esac
check="$(mktemp -d)"
trap 'rm -rf "$check"' EXIT
# Both modules must load into Debian's nginx (the stream one after Debian's ngx_stream_module).
printf 'load_module %s;\nload_module /usr/lib/nginx/modules/ngx_stream_module.so;\nload_module %s;\nevents {}\n' \
    "$bin/ngx_http_upsync_module.so" "$bin/ngx_stream_upsync_module.so" >"$check/nginx.conf"
if ! /usr/sbin/nginx -t -q -p "$check" -c "$check/nginx.conf" -e "$check/error.log" -g "pid $check/nginx.pid;" 2>"$check/stderr"; then
    cat "$check/stderr" >&2
    die "Debian's nginx refuses $bin/ngx_http_upsync_module.so or ngx_stream_upsync_module.so (built against another nginx? is libnginx-mod-stream installed?): run 'make deps', then 'make build' without NGINX_SOURCE_DIR"
fi

version="$(sed -n '/^\[workspace.package\]/,/^\[/ s/^version *= *"\(.*\)"/\1/p' "$here/Cargo.toml")"
[ -n "$version" ] || die "no [workspace.package] version in Cargo.toml"
deb_version="$version-${DEB_REVISION:-1}"
arch="$(dpkg --print-architecture)"
maintainer="${DEB_MAINTAINER:-upsync maintainers <upsync@example.invalid>}"
commit="$(git -C "$here" rev-parse --short HEAD 2>/dev/null || echo unknown)"
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git -C "$here" log -1 --format=%ct 2>/dev/null || date +%s)}"

stage="$out/stage"
rm -rf "$stage"
mkdir -p "$stage/debian" "$out"
# dpkg-shlibdeps reads debian/control of the "source package" it runs in.
printf 'Source: upsync\n\nPackage: libnginx-mod-http-upsync\nArchitecture: any\n\nPackage: libnginx-mod-stream-upsync\nArchitecture: any\n\nPackage: upsync-dns\nArchitecture: any\n\nPackage: upsync-sidecar\nArchitecture: any\n' \
    >"$stage/debian/control"

# install_doc PKG: copyright and a changelog.Debian in /usr/share/doc/PKG.
install_doc() {
    local pkg="$1" doc="$stage/debian/$1/usr/share/doc/$1"
    install -d "$doc"
    install -m 0644 "$pk/copyright" "$doc/copyright"
    {
        printf 'upsync (%s) unstable; urgency=medium\n\n' "$deb_version"
        printf '  * Built by scripts/package.sh from commit %s.\n\n' "$commit"
        printf ' -- %s  %s\n' "$maintainer" "$(date -u -R -d "@$SOURCE_DATE_EPOCH")"
    } | gzip -9n >"$doc/changelog.Debian.gz"
}

# install_gz SRC DEST: a compressed copy (documentation, man pages).
install_gz() {
    install -d "$(dirname "$2")"
    gzip -9n <"$1" >"$2"
    chmod 0644 "$2"
}

# finish PKG DEPENDS-EXTRA FIELDS DESCRIPTION: shlibs, control, md5sums, scripts, the .deb.
finish() {
    local pkg="$1" extra="$2" fields="$3" description="$4" root="$stage/debian/$1"
    local elves=() shlibs size
    while IFS= read -r f; do elves+=(-e "$f"); done < <(find "$root" -type f \( -name '*.so' -o -perm -u+x \) ! -path '*/DEBIAN/*')
    shlibs="$(cd "$stage" && dpkg-shlibdeps -O "${elves[@]}" 2>"$check/shlibdeps.err" | sed -n 's/^shlibs:Depends=//p')" || true
    [ -n "$shlibs" ] || die "dpkg-shlibdeps found no library dependencies for $pkg: $(cat "$check/shlibdeps.err")"
    size="$(du -k -s --apparent-size "$root" | cut -f1)"
    install -d "$root/DEBIAN"
    {
        printf 'Package: %s\nVersion: %s\nArchitecture: %s\nMaintainer: %s\nInstalled-Size: %s\n' "$pkg" "$deb_version" "$arch" "$maintainer" "$size"
        printf 'Depends: %s\n' "${extra:+$extra, }$shlibs"
        [ -n "$fields" ] && printf '%s\n' "$fields"
        printf 'Priority: optional\nDescription: %s\n' "$description"
    } >"$root/DEBIAN/control"
    (cd "$root" && find . -type f ! -path './DEBIAN/*' ! -path './etc/*' -printf '%P\n' | LC_ALL=C sort | xargs -r md5sum >DEBIAN/md5sums)
    [ -s "$root/DEBIAN/md5sums" ] || rm -f "$root/DEBIAN/md5sums"
    if [ -d "$root/etc" ]; then
        (cd "$root" && find etc -type f -printf '/%p\n' | LC_ALL=C sort >DEBIAN/conffiles)
    fi
    find "$root" -depth -newermt "@$SOURCE_DATE_EPOCH" -exec touch --no-dereference --date="@$SOURCE_DATE_EPOCH" {} +
    local deb="$out/${pkg}_${deb_version}_${arch}.deb"
    dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
    say "$(basename "$deb") ($(du -h "$deb" | cut -f1)): depends on $extra${extra:+, }$shlibs"
}

# --- libnginx-mod-http-upsync and libnginx-mod-stream-upsync -----------------------------------
# module_package PKG SO SHORT LINK: the .so, its load_module snippet (packaging/PKG/SHORT.conf)
# in modules-available, enabled through /etc/nginx/modules-enabled/LINK by the maintainer scripts
# (packaging/module/*.in, dh_nginx's snippets), README and examples.
module_package() {
    local pkg="$1" so="$2" short="$3" link="$4" root="$stage/debian/$1"
    install -d "$root/usr/lib/nginx/modules" "$root/usr/share/nginx/modules-available" "$root/DEBIAN"
    install -m 0644 "$bin/$so" "$root/usr/lib/nginx/modules/"
    strip --strip-debug --remove-section=.comment "$root/usr/lib/nginx/modules/$so"
    install -m 0644 "$pk/$pkg/$short.conf" "$root/usr/share/nginx/modules-available/"
    install_doc "$pkg"
    install_gz "$here/module/README.md" "$root/usr/share/doc/$pkg/README.md.gz"
    for s in postinst prerm postrm; do
        sed -e "s|@PKG@|$pkg|g" -e "s|@LINK@|$link|g" -e "s|@CONFPAIR@|$short.conf:$link|g" "$pk/module/$s.in" >"$root/DEBIAN/$s"
        chmod 0755 "$root/DEBIAN/$s"
    done
}

module_package libnginx-mod-http-upsync ngx_http_upsync_module.so mod-http-upsync 50-mod-http-upsync.conf
install -d "$stage/debian/libnginx-mod-http-upsync/usr/share/doc/libnginx-mod-http-upsync/examples"
install -m 0644 "$here"/nginx-conf/*.conf "$stage/debian/libnginx-mod-http-upsync/usr/share/doc/libnginx-mod-http-upsync/examples/"
finish libnginx-mod-http-upsync "$abi" "Recommends: nginx
Suggests: upsync-sidecar, upsync-dns, libnginx-mod-stream-upsync
Section: httpd" "upsync: nginx module keeping upstreams in step with Consul without reloads
 ngx_http_upsync_module long-polls Consul (KV folders, or services with their
 health) and swaps the servers of nginx upstreams in shared memory: within
 milliseconds every worker sends new requests to the new list, with no reload
 and no dropped keepalive connection. Directives compatible with
 nginx-upsync-module, plus Consul failover, ACL tokens, TLS and upstream_show.
 .
 Built for Debian's nginx ($abi); enabled through
 /etc/nginx/modules-enabled/50-mod-http-upsync.conf."

# The stream module loads after Debian's ngx_stream_module (50-mod-stream.conf), hence 70-, as
# Debian's own stream add-ons (libnginx-mod-stream-geoip*) do.
module_package libnginx-mod-stream-upsync ngx_stream_upsync_module.so mod-stream-upsync 70-mod-stream-upsync.conf
finish libnginx-mod-stream-upsync "$abi, libnginx-mod-stream" "Recommends: nginx
Suggests: upsync-sidecar, upsync-dns, libnginx-mod-http-upsync
Section: httpd" "upsync: nginx stream module keeping TCP/UDP upstreams in step with Consul
 ngx_stream_upsync_module is ngx_http_upsync_module for stream {} upstreams
 (nginx-stream-upsync-module's directives): new connections and UDP sessions
 go to the servers registered in Consul without a reload; established
 connections keep their server. upstream_show in a stream server lists them.
 .
 Built for Debian's nginx ($abi); enabled through
 /etc/nginx/modules-enabled/70-mod-stream-upsync.conf, after ngx_stream_module."

# --- upsync-dns and upsync-sidecar --------------------------------------------------------------
# service PKG CONF STATE_DIR: binary, configuration, unit, man page, maintainer scripts.
service() {
    local pkg="$1" conf="$2" state_dir="$3" root="$stage/debian/$1"
    install -d "$root/usr/sbin" "$root/etc/upsync" "$root/lib/systemd/system" "$root/DEBIAN"
    install -m 0755 "$bin/$pkg" "$root/usr/sbin/$pkg"
    strip --strip-debug --remove-section=.comment "$root/usr/sbin/$pkg"
    install -m 0644 "$pk/$pkg/$conf" "$root/etc/upsync/$conf"
    install -m 0644 "$pk/$pkg/$pkg.service" "$root/lib/systemd/system/$pkg.service"
    install -d "$root/usr/share/man/man8"
    help2man --no-info --no-discard-stderr --section 8 --manual "upsync" --include "$pk/$pkg/$pkg.h2m" \
        "$root/usr/sbin/$pkg" >"$check/$pkg.8"
    install_gz "$check/$pkg.8" "$root/usr/share/man/man8/$pkg.8.gz"
    install_doc "$pkg"
    for s in postinst prerm postrm; do
        sed -e "s|@PKG@|$pkg|g" -e "s|@CONF@|/etc/upsync/$conf|g" -e "s|@STATE_DIR@|$state_dir|g" "$pk/service/$s.in" >"$root/DEBIAN/$s"
        chmod 0755 "$root/DEBIAN/$s"
    done
}

service upsync-dns dns.toml ""
install_gz "$here/dns/README.md" "$stage/debian/upsync-dns/usr/share/doc/upsync-dns/README.md.gz"
finish upsync-dns "adduser" "Suggests: bind9-dnsutils, upsync-sidecar
Section: net" "upsync: DNS server for the services registered in Consul
 upsync-dns keeps the Consul catalog in memory, follows it with a fixed
 number of blocking queries whatever the number of services, and answers
 A/AAAA/SRV/TXT/PTR for the usable instances without asking Consul: for
 clients that cannot talk to Consul (nginx's resolve, resolvers, scripts).
 Forwarding with a cache for other names, response rate limiting, metrics.
 .
 The systemd unit runs it as the user upsync-dns with CAP_NET_BIND_SERVICE
 only; it is not enabled at installation (edit /etc/upsync/dns.toml first)."

service upsync-sidecar sidecar.toml /var/lib/upsync-sidecar
install_gz "$here/sidecar/README.md" "$stage/debian/upsync-sidecar/usr/share/doc/upsync-sidecar/README.md.gz"
install_gz "$here/sidecar/openapi.yaml" "$stage/debian/upsync-sidecar/usr/share/doc/upsync-sidecar/openapi.yaml.gz"
finish upsync-sidecar "adduser" "Suggests: docker.io | podman, libnginx-mod-http-upsync, upsync-dns
Section: net" "upsync: registers containers and scheduler endpoints in Consul
 upsync-sidecar runs on each host beside the container engine (Docker or
 podman, registrator's SERVICE_* labels) and a scheduler (HTTP API). It writes
 upsync KV entries for the nginx module and Consul services with checks,
 drains endpoints before removing them, and reconciles Consul with what runs
 after any fault, never touching what other hosts own.
 .
 The systemd unit runs it as the user upsync-sidecar without capabilities;
 it is not enabled at installation (edit /etc/upsync/sidecar.toml first)."

if command -v lintian >/dev/null; then
    lintian --no-tag-display-limit "$out"/*_"$deb_version"_"$arch".deb || say "lintian reported the tags above"
fi
rm -rf "$stage"
say "packages in $out"
